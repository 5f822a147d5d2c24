"""Progress lines of a sweep: one per started and one per finished run, with the time left.

Shared by every launcher, so a sweep reads the same whether its runs execute here, in a SLURM
job array or on a Ray cluster (remote launchers print no start lines: the run starts remotely).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TextIO

from lightning_bn.sweep.state import LOG_FILE, Plan


@dataclass(frozen=True)
class Outcome:
    """How one run ended. Picklable: cluster tasks send it back to the sweep."""

    plan: Plan
    ok: bool
    seconds: float
    failed_stage: str | None = None
    returncode: int | None = None
    message: str = ""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts started/finished runs of ``total`` and prints their lines to ``out`` (thread-safe).

    Args:
        total: runs to execute.
        parallel: how many run at once (for the estimate of the time left).
        out: where the lines go.
    """

    def __init__(self, total: int, parallel: int, out: TextIO | None = None) -> None:
        self.total, self.parallel = total, max(1, parallel)
        self.out = out if out is not None else sys.stdout
        self._lock = threading.Lock()
        self._started = self._finished = self._failed = 0
        self._durations: list[float] = []

    def say(self, line: str) -> None:
        with self._lock:
            self.out.write(line + "\n")
            self.out.flush()

    def started(self, name: str, note: str = "") -> None:
        with self._lock:
            self._started += 1
            number = self._started
        self.say(f"[{number:>{len(str(self.total))}}/{self.total}] start   {name}{note}")

    def finished(self, outcome: Outcome) -> None:
        plan = outcome.plan
        with self._lock:
            self._finished += 1
            self._failed += not outcome.ok
            if outcome.ok:
                self._durations.append(outcome.seconds)
            left = self.total - self._finished
            eta = ""
            if self._durations and left:
                mean = sum(self._durations) / len(self._durations)
                eta = f"; about {duration(mean * left / self.parallel)} left"
            counts = f"({self._finished - self._failed} done, {self._failed} failed, {left} to go{eta})"
        number = f"[{self._finished:>{len(str(self.total))}}/{self.total}]"
        if outcome.ok:
            self.say(f"{number} done    {plan.run.name}  {duration(outcome.seconds)}  {counts}")
            return
        what = outcome.message or f"{outcome.failed_stage} exited with status {outcome.returncode}"
        log = plan.dir / LOG_FILE
        tail = ""
        if log.is_file() and outcome.returncode is not None:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-5:]
            tail = "".join(f"\n      | {ln[:200]}" for ln in lines)
        self.say(f"{number} FAILED  {plan.run.name}: {what}  {counts}")
        self.say(f"      log: {log}{tail}")
