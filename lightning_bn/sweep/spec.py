"""A sweep file (YAML, one top-level ``sweep:`` key) parsed and checked into a :class:`SweepSpec`.

    sweep:
      name: vgg_norm_lr                      # runs go to <runs root>/<name>/<run name>/
      description: VGG standard vs BN at two learning rates (Santurkar Fig. 1)
      base_config: configs/quickstart.yaml   # one LightningCLI config or a list of them
      command: fit                           # fit | validate | test
      then: [test]                           # after fit, with checkpoints/last.ckpt
      grid:                                  # every combination is one run
        model.init_args.norm: [none, batch]  # a list: one option, several values
        base_lr: [0.001, 0.002]              # a plain name: a variable for `derived`
        data.init_args.batch_size: [32, 128]
        arch:                                # a mapping: labelled settings applied together
          vgg: {model: lightning_bn.VGG}
        seed_everything: [0, 1]
      derived:                               # arithmetic on the values above (see expr.py)
        model.init_args.lr: base_lr * data.init_args.batch_size
      overrides: {trainer.max_steps: 50}     # every run
      full:                                  # only with --full (paper scale)
        overrides: {trainer.max_epochs: 100}
        grid: {seed_everything: [0, 1, 2]}
      launcher:                              # options of --launcher slurm / ray (options.py)
        slurm: {partition: gpu, time: 240, gpus_per_run: 1}

An *option* is a LightningCLI key: it contains a dot or is one of :data:`TOP_LEVEL_OPTIONS`;
it reaches the run as ``--<key>=<value>``. Any other key is a *variable*: it only feeds
``derived`` (and must be used there, so a misspelled option fails instead of being ignored).
Documented for users in docs/experiments.md.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_bn.errors import ConfigError
from lightning_bn.sweep import expr
from lightning_bn.sweep.options import check_block

TOP_LEVEL_OPTIONS = ("seed_everything", "ckpt_path", "optimizer", "lr_scheduler", "model", "data", "trainer")
COMMANDS = ("fit", "validate", "test")
THEN_COMMANDS = ("validate", "test")
SWEEP_KEYS = (
    "name",
    "description",
    "base_config",
    "command",
    "then",
    "grid",
    "derived",
    "overrides",
    "full",
    "checkpoint",
    "checkpoint_every_n_steps",
    "report",
    "launcher",
)
FULL_KEYS = ("description", "grid", "derived", "overrides", "launcher")
# heatmap_y: the heat map's y axis (default: the lr axis); x: the x axis of Keskar Fig. 4 without a batch axis
REPORT_KEYS = ("batch_size", "lr", "heatmap_y", "x")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; a learning rate written that way must be a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def is_option(key: str) -> bool:
    """A LightningCLI key (passed to the run) as opposed to a variable (used by ``derived`` only)."""
    return "." in key or key in TOP_LEVEL_OPTIONS


def label_of(value: Any) -> str:
    """The text of a grid value in a run name: short, file-name safe, deterministic."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "+".join(f"{label_of(k)}-{label_of(v)}" for k, v in value.items()) or "empty"
    if isinstance(value, (list, tuple)):
        return "+".join(label_of(v) for v in value) or "empty"
    return _LABEL_UNSAFE.sub("_", str(value)).strip("_") or "_"


@dataclass(frozen=True)
class Axis:
    """One grid dimension. ``settings[i]`` maps option/variable keys to the values of choice ``i``."""

    key: str
    short: str
    labels: tuple[str, ...]
    values: tuple[Any, ...]  # what the report groups by: the value (list axis) or the label (mapping axis)
    settings: tuple[Mapping[str, Any], ...]
    coupled: bool

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for s in self.settings for k in s))


@dataclass(frozen=True)
class Derived:
    key: str
    text: str
    tree: ast.Expression


@dataclass(frozen=True)
class SweepSpec:
    name: str
    source: str
    description: str = ""
    base_configs: tuple[str, ...] = ()
    command: str = "fit"
    then: tuple[str, ...] = ()
    axes: tuple[Axis, ...] = ()
    derived: tuple[Derived, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: bool = True
    checkpoint_every_n_steps: int | None = None
    report: Mapping[str, str] = field(default_factory=dict)
    full: bool = False
    launcher: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # slurm:/ray: options (options.py)

    @property
    def experiment(self) -> str:
        """The directory name under the runs root: paper-scale runs never mix with CPU-scale ones."""
        return f"{self.name}-full" if self.full else self.name

    @property
    def stages(self) -> tuple[str, ...]:
        return (self.command, *self.then)


def read_sweep_file(path: str | Path) -> dict[str, Any]:
    """The mapping under ``sweep:`` of a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) != {"sweep"} or not isinstance(data["sweep"], dict):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(
            f"{path}: a sweep file has exactly one top-level key 'sweep:' holding a mapping; found {found}"
        )
    return data["sweep"]


def load_sweep(
    path: str | Path,
    *,
    full: bool = False,
    extra_overrides: Mapping[str, Any] | None = None,
    check_files: bool = True,
) -> SweepSpec:
    """Parse and check a sweep file. ``full`` applies its ``full:`` block; ``extra_overrides``
    (``--set`` on the command line) apply to every run. Relative ``base_config`` paths are
    resolved from the current directory, like every path on the LightningCLI command line."""
    raw = read_sweep_file(path)
    return build_spec(raw, source=str(path), full=full, extra_overrides=extra_overrides, check_files=check_files)


def build_spec(
    raw: Mapping[str, Any],
    *,
    source: str = "<sweep>",
    full: bool = False,
    extra_overrides: Mapping[str, Any] | None = None,
    check_files: bool = True,
) -> SweepSpec:
    where = f"{source}: sweep"
    _check_keys(raw, SWEEP_KEYS, where)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name={name!r} must be a file-name-safe string (letters, digits, _ . + -)")
    grid = _mapping(raw.get("grid") or {}, f"{where}.grid")
    derived = _mapping(raw.get("derived") or {}, f"{where}.derived")
    overrides = _mapping(raw.get("overrides") or {}, f"{where}.overrides")
    description = raw.get("description") or ""
    full_block = _mapping(raw.get("full") or {}, f"{where}.full")
    _check_keys(full_block, FULL_KEYS, f"{where}.full")
    if full:
        description = full_block.get("description", description)
        grid = {**grid, **_mapping(full_block.get("grid") or {}, f"{where}.full.grid")}
        derived = {**derived, **_mapping(full_block.get("derived") or {}, f"{where}.full.derived")}
        overrides = {**overrides, **_mapping(full_block.get("overrides") or {}, f"{where}.full.overrides")}
    launcher = check_block(raw.get("launcher") or {}, f"{where}.launcher")
    full_launcher = check_block(full_block.get("launcher") or {}, f"{where}.full.launcher")
    if full:  # paper scale asks for more time and GPUs: merged per launcher, key by key
        launcher = {n: {**launcher.get(n, {}), **full_launcher.get(n, {})} for n in {*launcher, *full_launcher}}
    for key, value in (extra_overrides or {}).items():
        overrides[key] = value

    command = raw.get("command", "fit")
    if command not in COMMANDS:
        raise ConfigError(f"{where}.command={command!r} is not allowed; choose one of: {', '.join(COMMANDS)}")
    then = raw.get("then") or []
    if isinstance(then, str):
        then = [then]
    if not isinstance(then, list) or any(t not in THEN_COMMANDS for t in then):
        raise ConfigError(f"{where}.then={then!r} must be a list of: {', '.join(THEN_COMMANDS)}")
    if then and command != "fit":
        raise ConfigError(f"{where}.then={then!r} needs command: fit (it runs on the checkpoint fit writes)")

    base = raw.get("base_config") or []
    base = [base] if isinstance(base, str) else base
    if not isinstance(base, list) or not all(isinstance(b, str) for b in base):
        raise ConfigError(f"{where}.base_config={base!r} must be a path or a list of paths")
    for b in base:
        if check_files and not Path(b).is_file():
            raise ConfigError(
                f"{where}.base_config {b!r} not found from the current directory {str(Path.cwd())!r} "
                "(relative paths are resolved from where you run the sweep, usually the project root)"
            )

    checkpoint = raw.get("checkpoint", True)
    if not isinstance(checkpoint, bool):
        raise ConfigError(f"{where}.checkpoint={checkpoint!r} must be true or false")
    every = raw.get("checkpoint_every_n_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"{where}.checkpoint_every_n_steps={every!r} must be an integer >= 1 or null")
    report = _mapping(raw.get("report") or {}, f"{where}.report")
    _check_keys(report, REPORT_KEYS, f"{where}.report")

    axes = _axes(grid, where)
    derived_list = [Derived(str(k), str(v), expr.parse(v, f"{where}.derived.{k}")) for k, v in derived.items()]
    _check_consistency(axes, derived_list, overrides, where)
    return SweepSpec(
        name=name,
        source=source,
        description=str(description).strip(),
        base_configs=tuple(base),
        command=command,
        then=tuple(dict.fromkeys(then)),
        axes=tuple(axes),
        derived=tuple(derived_list),
        overrides=dict(overrides),
        checkpoint=checkpoint,
        checkpoint_every_n_steps=every,
        report={str(k): str(v) for k, v in report.items()},
        full=full,
        launcher=launcher,
    )


def _check_keys(data: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return {str(k): v for k, v in value.items()}


def _axes(grid: Mapping[str, Any], where: str) -> list[Axis]:
    axes = []
    for key, choices in grid.items():
        here = f"{where}.grid.{key}"
        if isinstance(choices, list) and choices:
            if not is_option(key) and not _VARIABLE.match(key):
                raise ConfigError(f"{here}: a variable name must be an identifier, got {key!r}")
            labels = tuple(label_of(v) for v in choices)
            settings = tuple({key: v} for v in choices)
            axes.append(Axis(key, key, labels, tuple(choices), settings, coupled=False))
        elif isinstance(choices, dict) and choices:
            if not _VARIABLE.match(key):
                raise ConfigError(f"{here}: the name of a labelled axis must be an identifier, got {key!r}")
            labels = tuple(str(label) for label in choices)
            for label, setting in choices.items():
                if not _NAME.match(str(label)):
                    raise ConfigError(f"{here}: label {label!r} must be file-name safe (letters, digits, _ . + -)")
                if not isinstance(setting, dict) or not setting:
                    raise ConfigError(f"{here}.{label} must be a non-empty mapping of options, got {setting!r}")
            settings = tuple(_mapping(s, f"{here}.{label}") for label, s in choices.items())
            axes.append(Axis(key, key, labels, labels, settings, coupled=True))
        else:
            raise ConfigError(
                f"{here} must be a non-empty list of values or a mapping label -> options, got {choices!r}"
            )
        if len(set(axes[-1].labels)) != len(axes[-1].labels):
            raise ConfigError(f"{here}: two values give the same run-name label {list(axes[-1].labels)}")
    return _with_short_names(axes)


def _with_short_names(axes: list[Axis]) -> list[Axis]:
    """Shortest unique dotted suffix of each axis key for run names (``seed_everything`` -> ``seed``)."""

    def suffix(key: str, depth: int) -> str:
        if key == "seed_everything":
            return "seed"
        return ".".join(key.split(".")[-depth:])

    depth = {a.key: 1 for a in axes}
    while True:
        shorts = {a.key: suffix(a.key, depth[a.key]) for a in axes}
        seen = list(shorts.values())
        clashing = [a.key for a in axes if seen.count(shorts[a.key]) > 1]
        if not clashing:
            return [Axis(a.key, shorts[a.key], a.labels, a.values, a.settings, a.coupled) for a in axes]
        longer = [k for k in clashing if depth[k] <= k.count(".")]
        if not longer:
            raise ConfigError(f"grid axes {clashing} get the same short name in run names; rename one")
        for key in longer:
            depth[key] += 1


def _check_consistency(axes: list[Axis], derived: list[Derived], overrides: Mapping[str, Any], where: str) -> None:
    """Each key is set in one place only; each variable is used; each name ``derived`` reads exists."""
    owner: dict[str, str] = {}

    def claim(key: str, place: str) -> None:
        if key in owner:
            raise ConfigError(f"{where}: {key!r} is set by both {owner[key]} and {place}; set it in one place")
        owner[key] = place

    for key in overrides:
        claim(key, "overrides")
    for axis in axes:
        for key in axis.keys:
            claim(key, f"grid.{axis.key}")
    available = set(owner)
    used: set[str] = set()
    for d in derived:
        for name in expr.names_in(d.tree):
            if name not in available:
                known = ", ".join(sorted(available)) or "none"
                raise ConfigError(
                    f"{where}.derived.{d.key} reads {name!r}, which no grid axis or override sets; known: {known}"
                )
            used.add(name)
        claim(d.key, "derived")
        available.add(d.key)
    unused = [k for k in owner if not is_option(k) and k not in used]
    if unused:
        raise ConfigError(
            f"{where}: {unused[0]!r} is neither a LightningCLI option (options contain a dot or are one of "
            f"{', '.join(TOP_LEVEL_OPTIONS)}) nor a variable used by derived; check its spelling"
        )
