"""A :class:`SweepSpec` expanded into its runs: the grid product, derived values, run names."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from lightning_bn.errors import ConfigError
from lightning_bn.sweep import expr
from lightning_bn.sweep.spec import SweepSpec, is_option

MAX_NAME = 200  # file systems allow 255 bytes per path component


@dataclass(frozen=True)
class Run:
    """One point of the grid.

    ``values`` maps each axis key to its value (list axes) or label (labelled axes): what
    the report groups and labels by. ``options`` holds every LightningCLI option the run
    sets (overrides, grid, derived) in command-line order; ``variables`` the rest.
    """

    index: int
    name: str
    values: dict[str, Any]
    options: dict[str, Any]
    variables: dict[str, Any]


def expand(spec: SweepSpec) -> list[Run]:
    """Every combination of the grid axes, in the order the axes are written (last varies fastest)."""
    runs = []
    names: dict[str, int] = {}
    for index, choice in enumerate(itertools.product(*(range(len(a.labels)) for a in spec.axes))):
        settings: dict[str, Any] = dict(spec.overrides)
        values: dict[str, Any] = {}
        parts = []
        for axis, i in zip(spec.axes, choice):
            settings.update(axis.settings[i])
            values[axis.key] = axis.values[i]
            parts.append(f"{axis.short}={axis.labels[i]}")
        name = ",".join(parts) or "default"
        if len(name) > MAX_NAME:
            raise ConfigError(
                f"sweep {spec.name}: run name {name[:60]!r}... has {len(name)} characters (max {MAX_NAME}); "
                "use a labelled axis (label -> options) for long values"
            )
        if name in names:
            raise ConfigError(f"sweep {spec.name}: runs {names[name]} and {index} both get the name {name!r}")
        names[name] = index
        for d in spec.derived:
            settings[d.key] = expr.evaluate(d.tree, settings, f"sweep {spec.name}, run {name}: derived.{d.key}")
        options = {k: v for k, v in settings.items() if is_option(k)}
        # A parent key before its children: `--model=<class>` must come before `--model.init_args.*`.
        ordered = dict(sorted(options.items(), key=lambda item: item[0].count(".")))
        variables = {k: v for k, v in settings.items() if not is_option(k)}
        runs.append(Run(index, name, values, ordered, variables))
    return runs
