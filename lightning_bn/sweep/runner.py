"""Execute planned runs: one training process per stage, up to ``jobs`` runs at a time.

Each stage is a separate ``python -m lightning_bn <stage> ...`` process whose output goes
to the run's ``train.log`` (and to the terminal with one job, unless quiet), so one failing
run never takes the others down and parallel output never interleaves. Progress is one line
per started and finished run. On Ctrl-C (or SIGTERM) the sweep forwards SIGINT to its
training processes, which Lightning shuts down cleanly; the next invocation resumes.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, TextIO

from lightning_bn.errors import ConfigError
from lightning_bn.sweep.commands import LAST_CHECKPOINT, display, option_args, stage_args
from lightning_bn.sweep.progress import Outcome, Progress, duration, now
from lightning_bn.sweep.spec import SweepSpec
from lightning_bn.sweep.state import LOG_FILE, RUN_FILE, Plan, read_record, write_record

DEFAULT_ENTRY = (sys.executable, "-m", "lightning_bn")
__all__ = ["DEFAULT_ENTRY", "Outcome", "SweepRunner", "duration", "now"]


class SweepRunner:
    """Runs the ``pending``/``resume``/``restart`` plans of one sweep.

    Args:
        spec: the sweep.
        runs_root: directory holding ``<experiment>/<run>/``.
        jobs: runs executed at the same time (>= 1). With more than one, each training
            process gets ``OMP_NUM_THREADS = cpus // jobs`` unless the variable is set, so
            parallel CPU runs do not fight over cores.
        gpus_per_job: if > 0, job slot ``i`` sees GPUs ``i*k .. i*k+k-1`` through
            ``CUDA_VISIBLE_DEVICES``.
        entry: the program that takes LightningCLI arguments (tests substitute a stub).
        echo: copy the training output to ``out`` as well as to ``train.log``.
        out: where progress lines go.
        sweep_command: the command line of this sweep, recorded in run.json.
        record_extra: more fields for run.json (a cluster task records its job there).
        ignore_signals: signals the training processes ignore. A SLURM job step's warning
            signal (USR2) reaches every process of the step; its default action would kill the
            training outright, where the task stops it cleanly instead (see slurm_task.py).
        default_signals: signals the training processes handle by default even if this process
            ignores or blocks them. A Ray worker blocks SIGINT (children inherit the mask); its
            trainings must still stop on SIGINT.
    """

    def __init__(
        self,
        spec: SweepSpec,
        runs_root: str | Path,
        *,
        jobs: int = 1,
        gpus_per_job: int = 0,
        entry: Sequence[str] = DEFAULT_ENTRY,
        echo: bool = False,
        out: TextIO | None = None,
        sweep_command: str = "",
        record_extra: dict[str, Any] | None = None,
        ignore_signals: Sequence[int] = (),
        default_signals: Sequence[int] = (),
    ) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ConfigError(f"jobs must be an integer >= 1, got {jobs!r}")
        if isinstance(gpus_per_job, bool) or not isinstance(gpus_per_job, int) or gpus_per_job < 0:
            raise ConfigError(f"gpus_per_job must be an integer >= 0, got {gpus_per_job!r}")
        self.spec, self.runs_root, self.jobs, self.gpus_per_job = spec, runs_root, jobs, gpus_per_job
        self.entry, self.echo, self.sweep_command = list(entry), echo, sweep_command
        self.out = out if out is not None else sys.stdout
        self.record_extra, self.ignore_signals = dict(record_extra or {}), tuple(ignore_signals)
        self.default_signals = tuple(default_signals)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._live: set[subprocess.Popen] = set()
        self._progress = Progress(0, jobs, self.out)
        self._futures: list[Any] = []

    # -- public -----------------------------------------------------------------------
    def execute(self, plans: Sequence[Plan]) -> list[Outcome]:
        """Run every plan that needs running; returns their outcomes (in completion order)."""
        todo = [p for p in plans if p.to_execute]
        self._progress = Progress(len(todo), self.jobs, self.out)
        slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.jobs):
            slots.put(slot)
        outcomes: list[Outcome] = []
        pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="sweep")
        futures = self._futures = [pool.submit(self._guarded, plan, slots) for plan in todo]
        try:
            for future in as_completed(futures):
                outcomes.append(future.result())
        except KeyboardInterrupt:
            self.interrupt()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
        return outcomes

    def interrupt(self) -> None:
        """Start no new stage and ask the running training processes to stop (SIGINT).

        A process started with SIGINT ignored (e.g. ``cmd &`` from a non-interactive shell)
        passes the ignore on to its children, where SIGINT would do nothing: SIGTERM then,
        which Lightning also turns into a graceful stop.
        """
        self._stop.set()
        ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.SIGINT not in self.default_signals
        stop = signal.SIGTERM if ignored else signal.SIGINT
        with self._lock:
            for process in list(self._live):
                if process.poll() is None:
                    process.send_signal(stop)
        self._say("[sweep] interrupted: stopping the running trainings; run the same command again to resume")

    def wait(self, timeout: float) -> bool:
        """Wait until every run of :meth:`execute` has ended (after :meth:`interrupt`); True if they did."""
        return not wait_futures(self._futures, timeout=timeout).not_done

    def mark_queued(self, plan: Plan, launcher: dict[str, Any]) -> None:
        """Write run.json of a run handed to a scheduler: ``--list`` shows it queued, and a run
        restarted from scratch is cleared now, so that its task never resumes a stale checkpoint."""
        previous = read_record(plan.dir) or {}
        if plan.status == "restart":
            self._clear(plan.dir)
            previous = {"attempts": previous.get("attempts", 0)}
        plan.dir.mkdir(parents=True, exist_ok=True)
        record = self._record(plan, previous)
        for key in ("host", "pid", "started"):
            record.pop(key)
        record.update(status="queued", queued=now(), attempts=previous.get("attempts", 0), launcher=launcher)
        write_record(plan.dir, record)

    # -- one run ----------------------------------------------------------------------
    def _guarded(self, plan: Plan, slots: queue.Queue[int]) -> Outcome:
        slot = slots.get()
        try:
            return self._execute(plan, slot)
        except Exception as err:  # a bug or a full disk must not hide the other runs' results
            outcome = Outcome(plan, False, 0.0, message=f"{type(err).__name__}: {err}")
            self._report(plan, outcome)
            return outcome
        finally:
            slots.put(slot)

    def _execute(self, plan: Plan, slot: int) -> Outcome:
        if self._stop.is_set():
            return Outcome(plan, False, 0.0, message="not started (interrupted)")
        spec, run, directory = self.spec, plan.run, plan.dir
        previous = read_record(directory) or {}
        if plan.status == "restart":
            self._clear(directory)
            previous = {"attempts": previous.get("attempts", 0)}
        directory.mkdir(parents=True, exist_ok=True)
        record = self._record(plan, previous)
        write_record(directory, record)
        note = f" ({plan.status}: {plan.reason})" if plan.status != "pending" and plan.reason else ""
        self._progress.started(run.name, note)
        began = time.monotonic()
        for stage in plan.stages:
            resume = plan.resume_from if stage == spec.command else None
            if stage != spec.command and not (directory / LAST_CHECKPOINT).is_file():
                message = f"{stage} needs {directory / LAST_CHECKPOINT}, which {spec.command} did not write"
                return self._finish(plan, record, began, stage, None, message)
            args = stage_args(spec, run, stage, self.runs_root, resume)
            started = time.monotonic()
            code = self._run_process([*self.entry, *args], directory / LOG_FILE, self._env(slot), display(args))
            record["history"].append(
                {"command": display(args), "returncode": code, "seconds": round(time.monotonic() - started, 1)}
            )
            if code != 0:
                return self._finish(plan, record, began, stage, code, "")
            record["done"].append(stage)
            write_record(directory, record)
        return self._finish(plan, record, began, None, 0, "")

    def _record(self, plan: Plan, previous: dict[str, Any]) -> dict[str, Any]:
        spec, run = self.spec, plan.run
        return {
            "sweep": {
                "name": spec.name,
                "experiment": spec.experiment,
                "source": spec.source,
                "full": spec.full,
                "command": self.sweep_command,
                "description": spec.description,
                "derived": {d.key: d.text for d in spec.derived},
            },
            "run": run.name,
            "index": run.index,
            "values": run.values,
            "axes": {a.key: a.short for a in spec.axes},
            "options": run.options,
            "variables": run.variables,
            "report": dict(spec.report),
            "args": option_args(spec, run),
            "stages": list(spec.stages),
            "done": list(previous.get("done") or []),
            "history": list(previous.get("history") or []),
            "status": "running",
            "complete": False,
            "attempts": previous.get("attempts", 0) + 1,
            "started": now(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **self.record_extra,
        }

    def _finish(
        self, plan: Plan, record: dict[str, Any], began: float, stage: str | None, code: int | None, message: str
    ) -> Outcome:
        seconds = time.monotonic() - began
        ok = stage is None
        interrupted = not ok and self._stop.is_set()
        record.update(
            status="complete" if ok else ("interrupted" if interrupted else "failed"),
            complete=ok,
            finished=now(),
            returncode=code,
            seconds=round(seconds, 1),
        )
        if message:
            record["message"] = message
        write_record(plan.dir, record)
        outcome = Outcome(plan, ok, seconds, stage, code, message)
        self._report(plan, outcome)
        return outcome

    @staticmethod
    def _clear(directory: Path) -> None:
        """Remove what a previous attempt left (events, checkpoints): it would mix into the report."""
        if not directory.is_dir():
            return
        for item in directory.iterdir():
            if item.name in (RUN_FILE, LOG_FILE):
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()

    # -- processes --------------------------------------------------------------------
    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))
        if self.gpus_per_job:
            first = slot * self.gpus_per_job
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(self.gpus_per_job))
        return env

    def _run_process(self, command: list[str], log_path: Path, env: dict[str, str], shown: str) -> int:
        if self._stop.is_set():
            return -int(signal.SIGINT)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {now()} {shown}\n".encode())
            log.flush()
            # Own session: Ctrl-C reaches the training process once, through interrupt().
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE if self.echo else log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=self._child_signals if self.ignore_signals or self.default_signals else None,
            )
            with self._lock:
                self._live.add(process)
            try:
                if self.echo:
                    for chunk in iter(lambda: process.stdout.read1(65536), b""):
                        log.write(chunk)
                        log.flush()
                        self.out.write(chunk.decode(errors="replace"))
                        self.out.flush()
                return process.wait()
            finally:
                with self._lock:
                    self._live.discard(process)

    def _child_signals(self) -> None:  # in the child, before exec: SIG_IGN and SIG_DFL survive exec
        for number in self.ignore_signals:
            signal.signal(number, signal.SIG_IGN)
        for number in self.default_signals:
            signal.signal(number, signal.SIG_DFL)
        if self.default_signals:  # a blocked signal stays blocked across exec, too
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.default_signals)

    # -- progress ---------------------------------------------------------------------
    def _say(self, line: str) -> None:
        self._progress.say(line)

    def _report(self, plan: Plan, outcome: Outcome) -> None:
        self._progress.finished(outcome)
