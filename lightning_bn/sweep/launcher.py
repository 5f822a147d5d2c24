"""Where a sweep's runs execute: ``--launcher local|slurm|ray``.

Planning (:func:`~lightning_bn.sweep.state.plan`), skip/resume, run.json and ``--list`` are the
same for every launcher; a launcher only decides *where* each planned run executes. Each run,
wherever it goes, is executed by the same :class:`~lightning_bn.sweep.runner.SweepRunner` code
(on a cluster inside a :class:`~lightning_bn.sweep.task.RunTask`), so the runs directory looks
the same whichever launcher made it.

- ``local`` (default): this machine, ``--jobs`` at a time (local.py).
- ``slurm``: one SLURM job array through submitit, or submitit's local executor (slurm.py).
- ``ray``: one Ray task per run, on a local or an existing Ray cluster (ray_cluster.py).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from lightning_bn.errors import ConfigError
from lightning_bn.sweep.progress import Outcome
from lightning_bn.sweep.spec import SweepSpec
from lightning_bn.sweep.state import Plan, read_record


@dataclass(frozen=True)
class LaunchContext:
    """What every launcher needs from the command line.

    ``entry`` is the training program; None means ``python -m lightning_bn`` with the Python of
    the machine that executes the run (a cluster node need not have the submitter's path).
    """

    spec: SweepSpec
    runs_root: str
    entry: tuple[str, ...] | None
    out: TextIO
    sweep_command: str
    echo: bool = False


class Launcher(ABC):
    """Executes planned runs somewhere. Subclasses set ``name`` and implement :meth:`execute`."""

    name = ""
    #: False when :meth:`execute` returns once the runs are submitted (their outcomes come later)
    waits = True

    def __init__(self, context: LaunchContext, options: dict[str, Any]) -> None:
        self.context, self.options = context, options

    def check(self) -> None:
        """Raise ``ConfigError`` if the launcher cannot run here (missing extra, no cluster).
        Called before anything is written or submitted."""
        return None

    @abstractmethod
    def execute(self, plans: Sequence[Plan]) -> list[Outcome]:
        """Run (or submit) every plan that needs running; outcomes of the runs that ended.
        Ctrl-C raises ``KeyboardInterrupt`` after the runs were stopped and left resumable."""

    def where(self) -> str:
        """For the sweep's first line: how runs execute."""
        return f"through {self.name}"

    def close(self) -> None:
        """Release what :meth:`check` acquired (a Ray connection)."""
        return None


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"--launcher {extra} needs the {module} package: pip install 'lightning-bn[{extra}]'"
        ) from None


def make_launcher(name: str, context: LaunchContext, options: dict[str, Any], **local: Any) -> Launcher:
    """The launcher called ``name``; ``local`` holds the local runner's ``jobs``/``gpus_per_job``."""
    if name == "local":
        from lightning_bn.sweep.local import LocalLauncher

        return LocalLauncher(context, options, **local)
    if local.get("jobs", 1) != 1 or local.get("gpus_per_job", 0):
        raise ConfigError(
            f"--jobs and --gpus-per-job are options of --launcher local; with --launcher {name} each run "
            f"asks for its own resources (--{name}.gpus_per_run, --{name}.cpus_per_run)"
        )
    if name == "slurm":
        from lightning_bn.sweep.slurm import SlurmLauncher

        return SlurmLauncher(context, options)
    if name == "ray":
        from lightning_bn.sweep.ray_cluster import RayLauncher

        return RayLauncher(context, options)
    raise ConfigError(f"--launcher {name!r} is not a launcher; choose one of: local, slurm, ray")


def listed_status(plan: Plan) -> str:
    """The status ``--list`` shows: the plan's, or ``queued``/``running`` while a scheduler holds the run."""
    record = read_record(Path(plan.dir)) or {}
    if (record.get("launcher") or {}).get("name") == "slurm" and plan.status in ("resume", "restart"):
        from lightning_bn.sweep.slurm import queue_state

        return queue_state(record) or plan.status
    return plan.status
