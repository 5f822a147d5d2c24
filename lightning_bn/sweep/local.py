"""``--launcher local`` (the default): the runs execute on this machine, ``--jobs`` at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_bn.sweep.launcher import LaunchContext, Launcher
from lightning_bn.sweep.progress import Outcome
from lightning_bn.sweep.runner import DEFAULT_ENTRY, SweepRunner
from lightning_bn.sweep.state import Plan


class LocalLauncher(Launcher):
    """The :class:`SweepRunner` on this machine: one process per stage, ``jobs`` runs at once."""

    name = "local"

    def __init__(self, context: LaunchContext, options: dict[str, Any], jobs: int = 1, gpus_per_job: int = 0) -> None:
        super().__init__(context, options)
        self.runner = SweepRunner(
            context.spec,
            context.runs_root,
            jobs=jobs,
            gpus_per_job=gpus_per_job,
            entry=context.entry or DEFAULT_ENTRY,
            echo=context.echo,
            out=context.out,
            sweep_command=context.sweep_command,
        )

    def where(self) -> str:
        return f"{self.runner.jobs} at a time"

    def execute(self, plans: Sequence[Plan]) -> list[Outcome]:
        return self.runner.execute(plans)
