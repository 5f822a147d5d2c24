"""A run as a SLURM array task through submitit: preemption, time limits and multi-node DDP.

**One signal handler: submitit's.** submitit asks SLURM for ``--signal=USR2@<signal_delay_s>``
(before the time limit, and on preemption) and installs its handler in the task. The handler
calls :meth:`SlurmRunTask.checkpoint`, which stops the training with SIGINT (Lightning
shuts down cleanly), marks the run ``interrupted``, and hands submitit the same task again;
submitit requeues the job (``scontrol requeue``) and the requeued task plans again, which
resumes the run from ``checkpoints/last.ckpt``. Lightning's own SLURM auto-requeue listens for
SIGUSR1, which this job never asks for, so it never acts (do not add ``--signal=USR1`` to
``sbatch:``). SLURM sends USR2 to every process of the job step, the training too, whose default
action would be to die on the spot: the training processes ignore USR2.

**Multi-GPU, multi-node.** A run with ``trainer.devices: N`` and ``trainer.num_nodes: M`` gets
``--ntasks-per-node=N --nodes=M``; every task is one DDP rank, and Lightning reads its rank and
the master address from SLURM's environment. Rank 0 keeps the run's books (run.json, train.log)
and writes the stage commands of this attempt to ``<folder>/<job id>.stages.json``; the other
ranks run the same commands (their output goes to submitit's log of the task).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_bn.sweep.commands import stage_args
from lightning_bn.sweep.progress import Outcome
from lightning_bn.sweep.runner import SweepRunner
from lightning_bn.sweep.state import read_record, write_record
from lightning_bn.sweep.task import RunTask

#: how long the other ranks wait for rank 0's stage commands
FOLLOWER_WAIT_S = 600.0


@dataclass
class SlurmRunTask(RunTask):
    folder: str = ""
    stop_timeout_s: float = 60.0  # the training's clean stop must end before SLURM kills the job

    def __post_init__(self) -> None:
        self._runner: SweepRunner | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runner"] = None  # a live runner (threads, processes) never travels with the task
        return state

    def __call__(self) -> Outcome:
        import submitit

        os.chdir(self.cwd)
        env = submitit.JobEnvironment()
        if env.global_rank != 0:
            return self._follow(env.job_id)
        current = self.plan()
        if not current.to_execute:
            return Outcome(current, current.status == "complete", 0.0, message=f"not run: {current.status}")
        if env.num_tasks > 1:
            self._publish(env.job_id, current)
        self._runner = self.runner({"job_id": env.job_id}, ignore_signals=(signal.SIGUSR2,))
        return self.execute(current, self._runner)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's handler calls this on USR2 (time limit or preemption): stop, then requeue.
        (submitit looks for a method of this name; without one it would requeue a running training.)"""
        import submitit

        runner = self._runner
        if runner is not None:
            runner.interrupt()
            runner.wait(self.stop_timeout_s)
            current = self.plan()
            record = read_record(current.dir) or {}
            if record.get("status") in ("running", "failed"):  # the training died of the signal itself
                write_record(current.dir, {**record, "status": "interrupted"})
        print(f"[sweep] {self.run.name}: requeued; it resumes from its last checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(self)

    # -- DDP ranks > 0 -----------------------------------------------------------------------
    def _stages_file(self, job_id: str) -> Path:
        # one file per attempt: a requeued job keeps its id, and must not read the last attempt's
        return Path(self.folder) / f"{job_id}.{os.environ.get('SLURM_RESTART_COUNT', '0')}.stages.json"

    def _publish(self, job_id: str, current: Any) -> None:
        stages = [
            stage_args(self.spec, self.run, s, self.runs_root, current.resume_from if s == self.spec.command else None)
            for s in current.stages
        ]
        path = self._stages_file(job_id)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"stages": stages}))
        tmp.replace(path)

    def _follow(self, job_id: str) -> Outcome:
        """A rank > 0: run rank 0's commands of this attempt, in order, until one fails."""
        path = self._stages_file(job_id)
        deadline = time.monotonic() + FOLLOWER_WAIT_S
        while not path.is_file():
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank 0 of {self.run.name} wrote no stage commands to {path}")
            time.sleep(1.0)
        entry = list(self.entry or (sys.executable, "-m", "lightning_bn"))
        current = self.plan()
        for args in json.loads(path.read_text())["stages"]:
            code = subprocess.call([*entry, *args], preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
            if code != 0:
                return Outcome(current, False, 0.0, args[0], code)
        return Outcome(current, True, 0.0)
