"""One run as a picklable task for a cluster worker (a SLURM array task, a Ray task).

The task plans its run again where it executes, from what the run directory holds *then*: a
requeued or retried task resumes from ``checkpoints/last.ckpt`` like a local rerun, and a run
that another sweep completed meanwhile is skipped. It then runs the run through the same
:class:`SweepRunner` as the local launcher, so stages, run.json and train.log are identical.
Paths are relative to ``cwd``, the directory the sweep was started from: on a cluster it must be
on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_bn.sweep.expand import Run
from lightning_bn.sweep.progress import Outcome
from lightning_bn.sweep.runner import SweepRunner
from lightning_bn.sweep.spec import SweepSpec
from lightning_bn.sweep.state import Plan, plan

#: a file the sweep writes into a run directory to stop the run's task (Ctrl-C of a Ray sweep):
#: it works wherever the task runs, as the directory is on the shared filesystem
STOP_FILE = ".stop"


@dataclass
class RunTask:
    spec: SweepSpec
    run: Run
    runs_root: str
    cwd: str
    sweep_command: str = ""
    entry: tuple[str, ...] | None = None  # None: ``python -m lightning_bn`` of this worker
    launcher: dict[str, Any] = field(default_factory=dict)  # recorded in run.json

    def plan(self) -> Plan:
        return plan(self.spec, self.run, self.runs_root)

    def runner(self, record_extra: dict[str, Any] | None = None, ignore_signals: Sequence[int] = ()) -> SweepRunner:
        return SweepRunner(
            self.spec,
            self.runs_root,
            entry=self.entry or (sys.executable, "-m", "lightning_bn"),
            out=sys.stdout,
            sweep_command=self.sweep_command,
            record_extra={"launcher": {**self.launcher, **(record_extra or {})}},
            ignore_signals=ignore_signals,
            default_signals=(signal.SIGINT,),  # the task stops its training with SIGINT, wherever it runs
        )

    def __call__(self) -> Outcome:
        os.chdir(self.cwd)
        current = self.plan()
        if not current.to_execute:  # done (or taken) meanwhile: nothing to do, not a failure
            return Outcome(current, current.status == "complete", 0.0, message=f"not run: {current.status}")
        return self.execute(current, self.runner())

    @staticmethod
    def execute(current: Plan, runner: SweepRunner) -> Outcome:
        """Run ``current`` through ``runner`` in a thread, so that the main thread stays free for
        signal handlers (Ctrl-C, a scheduler's warning) that stop the run and wait for it."""
        result: list[Outcome] = []
        failure: list[BaseException] = []

        def target() -> None:
            try:
                result.extend(runner.execute([current]))
            except BaseException as err:  # re-raised in the main thread
                failure.append(err)

        stop = current.dir / STOP_FILE
        stop.unlink(missing_ok=True)  # left by an earlier sweep's Ctrl-C
        thread = threading.Thread(target=target, name="sweep-run", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.2)
                if stop.exists():
                    stop.unlink(missing_ok=True)
                    runner.interrupt()
        except KeyboardInterrupt:  # Ray's cancel, or Ctrl-C: stop the training, record "interrupted"
            runner.interrupt()
            thread.join()
            raise
        if failure:
            raise failure[0]
        return result[0]
