"""Find the runs under a directory and group them into experiments.

A *sweep run* is a directory with a ``run.json`` (written by ``python -m lightning_bn.sweep``):
its experiment is its parent directory (``<runs root>/<sweep name>/``, described by
``sweep.json``) and its grid values come from ``run.json``. Any other directory holding
TensorBoard event files (e.g. ``runs/quickstart/version_0`` from ``train.py``) is a *plain
run*, grouped with its siblings under its parent directory's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from lightning_bn.report.events import EVENT_GLOB, RunEvents, read_events

RUN_FILE = "run.json"
SWEEP_FILE = "sweep.json"


@dataclass
class RunInfo:
    name: str
    dir: Path
    record: dict[str, Any] = field(default_factory=dict)  # run.json; empty for a plain run

    @property
    def values(self) -> dict[str, Any]:
        """Grid axis key -> value (labelled axes: the label)."""
        return self.record.get("values", {})

    def get(self, key: str) -> Any:
        """A grid value, option or variable of the run; None if the run does not set it."""
        for part in ("values", "options", "variables"):
            if key in self.record.get(part, {}):
                return self.record[part][key]
        return None

    @property
    def commands(self) -> list[str]:
        return [h["command"] for h in self.record.get("history", [])]

    @cached_property
    def events(self) -> RunEvents:
        return read_events(self.dir)


@dataclass
class Experiment:
    name: str
    dir: Path
    runs: list[RunInfo]
    sweep: dict[str, Any] = field(default_factory=dict)  # sweep.json; empty for plain runs

    @cached_property
    def short(self) -> dict[str, str]:
        """Axis key -> its short name in run names (``model.init_args.lr`` -> ``lr``)."""
        out: dict[str, str] = {}
        for run in self.runs:
            out.update(run.record.get("axes", {}))
        return out

    @cached_property
    def varying(self) -> list[str]:
        """Axis keys whose value differs between runs, in grid order."""
        return [k for k in self.short if len({json.dumps(r.values.get(k), sort_keys=True) for r in self.runs}) > 1]

    @cached_property
    def seed_key(self) -> str | None:
        return next((k for k in self.varying if k == "seed_everything" or "seed" in self.short[k]), None)

    def label(self, run: RunInfo, exclude: tuple[str | None, ...] = ()) -> str:
        """``norm=batch, lr=0.1``: the run's varying values except the seed and ``exclude``."""
        keys = [k for k in self.varying if k != self.seed_key and k not in exclude]
        if not self.short:
            return run.name
        return ", ".join(f"{self.short[k]}={_text(run.values.get(k))}" for k in keys) or self.name

    def configurations(self, exclude: tuple[str | None, ...] = ()) -> dict[str, list[RunInfo]]:
        """Runs grouped by label: the seeds of one configuration together, in grid order."""
        groups: dict[str, list[RunInfo]] = {}
        for run in self.runs:
            groups.setdefault(self.label(run, exclude), []).append(run)
        return groups

    def axis_for(self, role: str) -> str | None:
        """The varying axis that plays ``role`` (``batch_size`` or ``lr``): the sweep's ``report:``
        hint, else the axis whose short name ends with the role's name."""
        hint = self.sweep.get("report", {}).get(role) or next(
            (r.record.get("report", {}).get(role) for r in self.runs if r.record.get("report")), None
        )
        if hint and any(r.get(hint) is not None for r in self.runs):
            return hint
        for key in self.varying:
            short = self.short[key]
            if short == role or short.endswith(("_" + role, "." + role)):
                return key
        return None


def _text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def discover(runs_dir: str | Path) -> list[Experiment]:
    """Every experiment under ``runs_dir``, sorted by name; runs in grid order."""
    root = Path(runs_dir)
    sweep_runs: dict[Path, list[RunInfo]] = {}
    plain_runs: dict[Path, list[RunInfo]] = {}
    run_files = sorted(root.rglob(RUN_FILE))
    sweep_dirs = [p.parent for p in run_files]
    for path in run_files:
        sweep_runs.setdefault(path.parent.parent, []).append(RunInfo(path.parent.name, path.parent, _read_json(path)))
    event_dirs = sorted({p.parent for p in root.rglob(EVENT_GLOB)})
    for directory in event_dirs:
        if any(directory == d or d in directory.parents for d in sweep_dirs):
            continue  # part of a sweep run (e.g. its test/ stage)
        if any(other in directory.parents for other in event_dirs):
            continue  # a sub-directory of a plain run
        plain_runs.setdefault(directory.parent, []).append(RunInfo(directory.name, directory))
    experiments = []
    for parent, runs in sweep_runs.items():
        runs.sort(key=lambda r: (r.record.get("index", 0), r.name))
        # sweep.json is written when a sweep starts; run.json carries the essentials too.
        sweep = _read_json(parent / SWEEP_FILE) or dict(runs[0].record.get("sweep", {}))
        name = sweep.get("experiment") or parent.name
        experiments.append(Experiment(name, parent, runs, sweep))
    for parent, runs in plain_runs.items():
        name = parent.relative_to(root).as_posix() if parent != root else root.resolve().name
        experiments.append(Experiment(name, parent, runs))
    return sorted(experiments, key=lambda e: e.name)
