"""``run.json``: what each run is and how far it got, so a sweep can be stopped and restarted.

The sweep writes ``run.json`` in the run's directory before the first training process
starts and after each stage (``fit``, then ``test``...). It holds the run's grid values and
options (the report reads them), the exact commands executed, the stages done, and
``complete: true`` once every stage succeeded. :func:`plan` turns it into what to do next:

- ``pending``: never started.
- ``complete``: every stage done with the same options: skipped.
- ``resume``: started but not finished (crashed, killed, interrupted): continues from
  ``checkpoints/last.ckpt`` if the fit wrote one, and runs only the stages not yet done.
- ``restart``: not finished and nothing to resume from, or its options changed since:
  the directory is cleared (``run.json`` and ``train.log`` are kept) and the run starts over.
- ``changed``: complete, but the sweep file now gives it other options: skipped with a
  warning (re-run with ``--rerun-changed``).
- ``running``: another sweep process on this machine is running it right now: skipped.
- ``blocked``: the directory exists without ``run.json`` (not made by a sweep): left alone.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_bn.sweep.commands import LAST_CHECKPOINT, option_args, run_dir
from lightning_bn.sweep.expand import Run
from lightning_bn.sweep.spec import SweepSpec

RUN_FILE = "run.json"
LOG_FILE = "train.log"
TO_EXECUTE = ("pending", "resume", "restart")


@dataclass(frozen=True)
class Plan:
    run: Run
    dir: Path
    status: str
    stages: tuple[str, ...]  # the stages still to run
    resume_from: Path | None = None
    reason: str = ""

    @property
    def to_execute(self) -> bool:
        return self.status in TO_EXECUTE


def read_record(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a torn write (machine crash): treat as started, nothing known to be done


def write_record(directory: Path, record: dict[str, Any]) -> None:
    """Write run.json atomically, so a crash never leaves half a file."""
    _write_json(Path(directory) / RUN_FILE, record)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # A per-process temporary name: jobs of a cluster array may write the same sweep.json at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _alive_here(record: dict[str, Any]) -> bool:
    """Is the sweep process that marked this run as running still alive on this machine?"""
    pid, host = record.get("pid"), record.get("host")
    if record.get("status") != "running" or not isinstance(pid, int) or host != socket.gethostname():
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def plan(spec: SweepSpec, run: Run, runs_root: str | Path, rerun_changed: bool = False) -> Plan:
    """What to do with ``run`` given what its directory holds."""
    directory = run_dir(spec, run, runs_root)
    record = read_record(directory)
    stages = spec.stages
    if record is None:
        if directory.exists() and any(directory.iterdir()):
            return Plan(run, directory, "blocked", (), reason=f"{directory} exists without {RUN_FILE}; move it away")
        return Plan(run, directory, "pending", stages)
    same = record.get("args") == option_args(spec, run) and record.get("stages") == list(stages)
    if record.get("complete"):
        if same:
            return Plan(run, directory, "complete", ())
        if not rerun_changed:
            return Plan(
                run,
                directory,
                "changed",
                (),
                reason="its options changed since it completed; --rerun-changed re-runs it",
            )
        return Plan(run, directory, "restart", stages, reason="its options changed (--rerun-changed)")
    if not same:
        return Plan(run, directory, "restart", stages, reason="its options changed since it started")
    if _alive_here(record):
        return Plan(run, directory, "running", (), reason=f"sweep process {record['pid']} is running it")
    done = set(record.get("done") or [])
    remaining = tuple(s for s in stages if s not in done)
    if spec.command in done:
        return Plan(run, directory, "resume", remaining, reason=f"{spec.command} done")
    last = directory / LAST_CHECKPOINT
    if spec.command == "fit" and last.is_file():
        return Plan(run, directory, "resume", remaining, resume_from=last, reason=f"from {LAST_CHECKPOINT}")
    return Plan(run, directory, "restart", stages, reason="no checkpoint to resume from")


SWEEP_FILE = "sweep.json"


def write_sweep_record(spec: SweepSpec, runs_root: str | Path, command: str) -> Path:
    """``<runs root>/<experiment>/sweep.json``: the sweep as run, for the report's experiment header."""
    directory = Path(runs_root) / spec.experiment
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "name": spec.name,
        "experiment": spec.experiment,
        "description": spec.description,
        "source": spec.source,
        "full": spec.full,
        "command": command,
        "base_configs": list(spec.base_configs),
        "stages": list(spec.stages),
        "axes": [{"key": a.key, "short": a.short, "values": list(a.values)} for a in spec.axes],
        "derived": {d.key: d.text for d in spec.derived},
        "overrides": dict(spec.overrides),
        "report": dict(spec.report),
    }
    path = directory / SWEEP_FILE
    _write_json(path, record)
    return path
