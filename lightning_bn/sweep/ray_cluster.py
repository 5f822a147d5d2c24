"""``--launcher ray``: each run a Ray task with its own resources, on a local or existing cluster.

Each task is a :class:`~lightning_bn.sweep.task.RunTask`: the same stage commands and run
directory as the local runner, so results and logs land in the runs directory (on a cluster, a
filesystem every node mounts at the same path). A run that fails is only that run's failure; a
task whose worker or node died is retried (``max_retries``) and resumes from ``last.ckpt``.
Ctrl-C cancels the tasks: queued ones never start, and a running one sees the stop file the
sweep writes into its run directory (Ray's own cancel does not reach a task blocked in a
subprocess), stops its training with SIGINT and marks the run ``interrupted``; the same command
resumes it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from lightning_bn.errors import ConfigError
from lightning_bn.sweep.launcher import Launcher, require
from lightning_bn.sweep.progress import Outcome, Progress
from lightning_bn.sweep.state import Plan, read_record
from lightning_bn.sweep.task import STOP_FILE, RunTask

#: how long cancelled tasks get to stop their trainings and write run.json
CANCEL_WAIT_S = 60.0


def _probe(address: str | None) -> None:
    """Fail fast on a HOST:PORT nobody listens on: ray.init would retry for minutes."""
    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("expected HOST:PORT, ray://HOST:PORT or auto")
    with socket.create_connection((host, int(port)), timeout=5.0):
        pass


def _running(plan: Plan) -> bool:
    return (read_record(plan.dir) or {}).get("status") == "running"


def run_task(task: RunTask) -> Outcome:
    """The Ray task: a plain function, so Ray pickles it by reference to this module."""
    return task()


class RayLauncher(Launcher):
    name = "ray"

    def __init__(self, context: Any, options: dict[str, Any]) -> None:
        super().__init__(context, options)
        self._started_here = False

    def where(self) -> str:
        address = self.options["address"]
        return f"as Ray tasks on {address}" if address else "as Ray tasks on a local Ray cluster"

    def check(self) -> None:
        """Connect (or start the local cluster) now: an unreachable address fails before any run."""
        self.ray = require("ray", "ray")
        if self.ray.is_initialized():
            return
        address, num_cpus = self.options["address"], self.options["num_cpus"]
        try:
            _probe(address)
            self.ray.init(
                address=address,
                num_cpus=num_cpus if address is None else None,
                include_dashboard=False,
                log_to_driver=False,  # each run's output is in its train.log
            )
        except Exception as err:  # ConnectionError, or a RuntimeError naming the address
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"--ray.address {address}: cannot connect to a Ray cluster ({first[:300]})") from None
        self._started_here = True

    def close(self) -> None:
        if self._started_here:
            self.ray.shutdown()
            self._started_here = False

    def execute(self, plans: Sequence[Plan]) -> list[Outcome]:
        todo = [p for p in plans if p.to_execute]
        if not todo:  # nothing to run: check() did not connect
            return []
        ray, o, context = self.ray, self.options, self.context
        remote = ray.remote(num_cpus=o["cpus_per_run"], num_gpus=o["gpus_per_run"], max_retries=o["max_retries"])(
            run_task
        )
        refs = {}
        for p in todo:
            task = RunTask(
                context.spec,
                p.run,
                context.runs_root,
                cwd=os.getcwd(),
                sweep_command=context.sweep_command,
                entry=context.entry,
                launcher={"name": "ray", "address": o["address"] or "local"},
            )
            refs[remote.remote(task)] = p
        progress = Progress(len(refs), len(refs), context.out)
        outcomes: list[Outcome] = []
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                for ref in done:
                    outcomes.append(self._outcome(ref, refs[ref]))
                    progress.finished(outcomes[-1])
        except KeyboardInterrupt:
            for ref in pending:  # a started task stops at its stop file, a queued one never starts
                (refs[ref].dir / STOP_FILE).touch() if refs[ref].dir.is_dir() else None
                ray.cancel(ref)
            # Ray reports a cancelled task at once; its run is stopped once run.json says so
            deadline = time.monotonic() + CANCEL_WAIT_S
            while time.monotonic() < deadline and any(_running(refs[r]) for r in pending):
                time.sleep(0.2)
            progress.say(f"[sweep] interrupted: cancelled {len(pending)} runs; run the same command again to resume")
            raise
        return outcomes

    def _outcome(self, ref: Any, plan: Plan) -> Outcome:
        try:
            return self.ray.get(ref)
        except Exception as err:  # the task itself failed (worker died past its retries, cancelled)
            lines = [ln for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            return Outcome(plan, False, 0.0, message=f"Ray task: {lines[0][:300]}")
