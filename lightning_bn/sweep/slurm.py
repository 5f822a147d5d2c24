"""``--launcher slurm``: the sweep's pending runs as one SLURM job array, through submitit.

Each array task is a :class:`~lightning_bn.sweep.slurm_task.SlurmRunTask`: it runs exactly the
stage commands the local runner runs, into the same run directory, and requeues itself on
preemption or at the time limit (one signal handler, submitit's: see slurm_task.py). Runs that
ask for other layouts (``trainer.devices`` x ``trainer.num_nodes``) go to one array per layout.

The sweep returns once the array is submitted (``--slurm.wait true`` follows it to the end);
``--list`` then shows ``queued``/``running`` runs from run.json and SLURM's job state, and the
same sweep command submits only runs no job holds. ``--slurm.cluster local`` runs the same tasks
through submitit's local executor (real subprocesses, the same code path) and always waits.
"""

from __future__ import annotations

import getpass
import math
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_bn.errors import ConfigError
from lightning_bn.sweep.expand import Run
from lightning_bn.sweep.launcher import Launcher, require
from lightning_bn.sweep.progress import Outcome, Progress
from lightning_bn.sweep.runner import SweepRunner
from lightning_bn.sweep.slurm_task import SlurmRunTask
from lightning_bn.sweep.state import Plan, read_record

_QUEUED = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESIZING", "SUSPENDED")
_RUNNING = ("RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "STOPPED")
_NOT_REACHABLE = "--launcher slurm: SLURM is not reachable from here"
#: how long cancelled local tasks get to stop their trainings and write run.json
CANCEL_WAIT_S = 60.0


def queue_state(record: dict[str, Any]) -> str | None:
    """``queued``/``running`` while SLURM holds the run's job (sacct), else None."""
    info = record.get("launcher") or {}
    if info.get("cluster") != "slurm" or not info.get("job_id") or record.get("status") not in ("queued", "running"):
        return None
    try:
        import submitit

        state = submitit.SlurmJob(folder=info["folder"], job_id=str(info["job_id"])).state
    except Exception:  # no submitit here, or sacct failed: run.json alone decides
        return None
    state = str(state).split()[0]
    return "queued" if state in _QUEUED else "running" if state in _RUNNING else None


def layout(run: Run, cluster: str) -> tuple[int, int]:
    """(tasks per node, nodes) of a run: one task per DDP rank, as Lightning expects under SLURM.
    The local executor has one node, where Lightning starts its DDP processes itself."""
    devices, nodes = run.options.get("trainer.devices", 1), run.options.get("trainer.num_nodes", 1)
    if cluster == "local":
        return 1, 1
    devices = devices if isinstance(devices, int) and not isinstance(devices, bool) and devices > 1 else 1
    nodes = nodes if isinstance(nodes, int) and not isinstance(nodes, bool) and nodes > 1 else 1
    return devices, nodes


def sbatch_parameters(lines: Sequence[str]) -> dict[str, Any]:
    """``["--constraint=a100", "--exclusive"]`` -> submitit's ``{"constraint": "a100", "exclusive": True}``."""
    out: dict[str, Any] = {}
    for line in lines:
        key, _, value = line[2:].replace(" ", "=", 1).partition("=")
        out[key] = value if value else True
    return out


class SlurmLauncher(Launcher):
    name = "slurm"

    def __init__(self, context: Any, options: dict[str, Any]) -> None:
        super().__init__(context, options)
        self.cluster = options["cluster"]
        self.waits = self.cluster == "local" or options["wait"]
        spec = context.spec
        self.folder = Path(options["folder"] or Path(context.runs_root) / spec.experiment / ".submitit")
        self.books = SweepRunner(spec, context.runs_root, sweep_command=context.sweep_command, out=context.out)

    def where(self) -> str:
        if self.cluster == "local":
            return "as SLURM tasks through submitit's local executor (--slurm.cluster local)"
        return f"as a SLURM job array through submitit, up to {self.options['array_parallelism']} at a time"

    def check(self) -> None:
        self.submitit = require("submitit", "slurm")
        if self.cluster == "local":
            return
        if shutil.which("sbatch") is None:
            raise ConfigError(
                f"{_NOT_REACHABLE} (no sbatch on PATH); run the sweep on a login node of the cluster, "
                "or try it on this machine with --slurm.cluster local"
            )
        user = os.environ.get("USER") or getpass.getuser()
        try:
            probe = subprocess.run(
                ["squeue", "--noheader", f"--user={user}"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise ConfigError(f"{_NOT_REACHABLE} (squeue: {err})") from None
        if probe.returncode != 0:
            first = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[0]
            raise ConfigError(f"{_NOT_REACHABLE} (squeue: {first})")

    # -- submission ---------------------------------------------------------------------------
    def executor(self, tasks_per_node: int, nodes: int) -> Any:
        o = self.options
        executor = self.submitit.AutoExecutor(
            folder=str(self.folder),
            cluster=self.cluster,
            slurm_max_num_timeout=o["max_requeues"],
            local_max_num_timeout=o["max_requeues"],
        )
        cpus = o["cpus_per_run"]
        executor.update_parameters(
            name=o["job_name"] or f"sweep-{self.context.spec.experiment}",
            timeout_min=math.ceil(o["time"]),
            nodes=nodes,
            tasks_per_node=tasks_per_node,
            gpus_per_node=o["gpus_per_run"] or None,
            cpus_per_task=max(1, cpus // tasks_per_node) if cpus else None,
            mem_gb=o["mem_gb"],
            slurm_partition=o["partition"],
            slurm_account=o["account"],
            slurm_qos=o["qos"],
            slurm_array_parallelism=o["array_parallelism"],
            slurm_additional_parameters=sbatch_parameters(o["sbatch"]) or None,
            slurm_setup=o["setup"] or None,
            slurm_signal_delay_s=o["signal_delay_s"],
            local_setup=o["setup"] or None,
        )
        return executor

    def task(self, plan: Plan) -> SlurmRunTask:
        context = self.context
        return SlurmRunTask(
            context.spec,
            plan.run,
            context.runs_root,
            cwd=os.getcwd(),
            sweep_command=context.sweep_command,
            entry=context.entry,
            launcher={"name": "slurm", "cluster": self.cluster, "folder": str(self.folder.resolve())},
            folder=str(self.folder.resolve()),
            stop_timeout_s=max(5.0, self.options["signal_delay_s"] - 30.0),
        )

    def execute(self, plans: Sequence[Plan]) -> list[Outcome]:
        todo = []
        for p in plans:
            if not p.to_execute:
                continue
            held = queue_state(read_record(p.dir) or {}) if self.cluster == "slurm" else None
            if held:
                self.books._say(f"[sweep] skipping {p.run.name}: {held} in SLURM (see --list)")
                continue
            todo.append(p)
        if not todo:
            return []
        self.folder.mkdir(parents=True, exist_ok=True)
        groups: dict[tuple[int, int], list[Plan]] = {}
        for p in todo:
            groups.setdefault(layout(p.run, self.cluster), []).append(p)
        jobs = []
        for (tasks_per_node, nodes), group in groups.items():
            jobs += self._submit(self.executor(tasks_per_node, nodes), group)
        return self._follow(jobs) if self.waits else []

    def _submit(self, executor: Any, group: list[Plan]) -> list[tuple[Any, Plan]]:
        before = [read_record(p.dir) for p in group]
        try:
            with executor.batch():
                submitted = [executor.submit(self.task(p)) for p in group]
        except Exception as err:  # sbatch refused: a partition, account or time the cluster does not accept
            lines = [ln for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            raise ConfigError(f"sbatch refused the job array: {lines[-1][:300]}") from None
        for p, job, old in zip(group, submitted, before):
            if read_record(p.dir) == old:  # the task has not started yet: it is queued
                self.books.mark_queued(p, {**self.task(p).launcher, "job_id": job.job_id})
        first = str(submitted[0].job_id).split("_")[0]
        where = f"SLURM job array {first}" if self.cluster == "slurm" else "submitit's local executor"
        self.books._say(
            f"[sweep] submitted {len(group)} runs to {where}; follow with --list"
            + (f", squeue -j {first}" if self.cluster == "slurm" else "")
            + f" and tensorboard --logdir {Path(self.context.runs_root) / self.context.spec.experiment}"
        )
        return list(zip(submitted, group))

    # -- following ----------------------------------------------------------------------------
    def _follow(self, jobs: list[tuple[Any, Plan]]) -> list[Outcome]:
        progress = Progress(len(jobs), min(len(jobs), self.options["array_parallelism"]), self.context.out)
        poll = 0.5 if self.cluster == "local" else self.options["poll_s"]
        pending, outcomes = list(jobs), []
        try:
            while pending:
                for item in [j for j in pending if j[0].done()]:
                    pending.remove(item)
                    outcomes.append(self._outcome(*item))
                    progress.finished(outcomes[-1])
                if pending:
                    time.sleep(poll)
        except KeyboardInterrupt:
            for job, _ in pending:  # the tasks stop their trainings; the runs stay resumable
                job.cancel(check=False)
            deadline = time.monotonic() + CANCEL_WAIT_S  # let them write run.json before we return
            while self.cluster == "local" and time.monotonic() < deadline and not all(j.done() for j, _ in pending):
                time.sleep(0.2)
            progress.say(f"[sweep] interrupted: cancelled {len(pending)} jobs; run the same command again to resume")
            raise
        return outcomes

    @staticmethod
    def _outcome(job: Any, plan: Plan) -> Outcome:
        try:
            result = job.result()
        except Exception as err:  # the task failed outside the training (a requeue limit, a node)
            lines = [ln for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            return Outcome(plan, False, 0.0, message=f"job {job.job_id}: {lines[-1][:300]}")
        return result if isinstance(result, Outcome) else Outcome(plan, False, 0.0, message=f"job {job.job_id}")
