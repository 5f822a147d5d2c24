"""The options of the cluster launchers: ``--slurm.KEY VALUE`` / ``--ray.KEY VALUE`` and the
sweep file's ``launcher:`` block, checked before anything is submitted.

    sweep:
      launcher:
        slurm: {partition: gpu, time: 240, gpus_per_run: 1, cpus_per_run: 8, mem_gb: 32}
        ray: {cpus_per_run: 2, gpus_per_run: 1}

The command line wins over the file, the file's ``full.launcher`` over its ``launcher`` with
``--full``. This module imports neither submitit nor ray: a sweep file is checked on any machine.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from lightning_bn.errors import ConfigError, format_value

LAUNCHER_NAMES = ("local", "slurm", "ray")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d+):(\d+)$")  # SLURM's D-HH:MM:SS and HH:MM:SS


def _integer(minimum: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        return value

    return check


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError("must be a number >= 0")
    return value


def _text(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _flag(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _lines(value: Any) -> Any:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("must be a string or a list of strings")
    return list(value)


def _sbatch_lines(value: Any) -> Any:
    lines = _lines(value)
    for line in lines:
        if not line.startswith("--"):
            raise ValueError(
                f"holds #SBATCH options written as on sbatch's command line, e.g. '--constraint=a100'; got {line!r}"
            )
    return lines


def _minutes(value: Any) -> Any:
    """Minutes, as an integer or as SLURM writes times (``1-00:00:00``, ``04:00:00``)."""
    found = _TIME.match(value.strip()) if isinstance(value, str) else None
    if found:
        days, hours, minutes, seconds = (int(g or 0) for g in found.groups())
        total = days * 1440 + hours * 60 + minutes + (seconds > 0)  # whole minutes, rounded up
        if total >= 1:
            return total
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError("must be minutes (a number > 0) or a SLURM time such as 04:00:00 or 1-00:00:00")


def _choice(*choices: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"is not allowed; choose one of: {', '.join(choices)}")
        return value

    return check


@dataclass(frozen=True)
class Option:
    default: Any
    check: Callable[[Any], Any]
    help: str


SLURM_OPTIONS: dict[str, Option] = {
    "cluster": Option("slurm", _choice("slurm", "local"), "slurm, or local: the same tasks on this machine"),
    "partition": Option(None, _text, "sbatch --partition"),
    "time": Option(60, _minutes, "time limit per run attempt, minutes or HH:MM:SS; a run that hits it is requeued"),
    "gpus_per_run": Option(0, _integer(0), "GPUs per run (per node when trainer.num_nodes > 1)"),
    "cpus_per_run": Option(None, _integer(1), "CPUs per run (per node when trainer.num_nodes > 1)"),
    "mem_gb": Option(None, _number, "memory per node in GB (sbatch --mem)"),
    "account": Option(None, _text, "sbatch --account"),
    "qos": Option(None, _text, "sbatch --qos"),
    "array_parallelism": Option(256, _integer(1), "runs of the job array running at the same time (%N)"),
    "sbatch": Option([], _sbatch_lines, "extra #SBATCH lines, e.g. ['--constraint=a100', '--exclusive']"),
    "setup": Option([], _lines, "shell lines run before each task, e.g. 'module load cuda'"),
    "job_name": Option(None, _text, "the jobs' name (default: sweep-<experiment>)"),
    "folder": Option(None, _text, "submitit's scripts and logs (default: <runs root>/<experiment>/.submitit)"),
    "signal_delay_s": Option(120, _integer(10), "seconds before the time limit when SLURM warns the task (USR2)"),
    "max_requeues": Option(3, _integer(0), "requeues after hitting the time limit (preemptions always requeue)"),
    "wait": Option(False, _flag, "follow the jobs until they end (cluster local always waits)"),
    "poll_s": Option(15.0, _number, "seconds between checks of the job states while waiting"),
}
RAY_OPTIONS: dict[str, Option] = {
    "address": Option(None, _text, "an existing Ray cluster ('auto', 'ray://host:10001'); default: start a local one"),
    "num_cpus": Option(None, _integer(1), "CPUs of the local cluster started without an address (default: all)"),
    "cpus_per_run": Option(1, _number, "CPUs each run's task reserves"),
    "gpus_per_run": Option(0, _number, "GPUs each run's task reserves (Ray sets CUDA_VISIBLE_DEVICES)"),
    "max_retries": Option(3, _integer(0), "retries of a run whose worker or node died (it resumes from last.ckpt)"),
}
OPTIONS: dict[str, dict[str, Option]] = {"slurm": SLURM_OPTIONS, "ray": RAY_OPTIONS}


def check_options(launcher: str, values: Mapping[str, Any], where: Callable[[str], str]) -> dict[str, Any]:
    """``values`` checked against the launcher's table; ``where(key)`` names the key in messages."""
    table = OPTIONS[launcher]
    out = {}
    for key, value in values.items():
        if key not in table:
            close = difflib.get_close_matches(key, table, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{where(key)}: not an option of the {launcher} launcher; {hint}(options: {', '.join(table)})"
            )
        try:
            out[key] = table[key].check(value)
        except ValueError as err:
            raise ConfigError(f"{where(key)}={format_value(value)} {err}") from None
    return out


def check_block(block: Any, where: str) -> dict[str, dict[str, Any]]:
    """The sweep file's ``launcher:`` mapping: ``{slurm: {...}, ray: {...}}``, checked."""
    if not isinstance(block, dict):
        raise ConfigError(f"{where} must be a mapping with slurm: and/or ray:, got {block!r}")
    out = {}
    for name, values in block.items():
        if name not in OPTIONS:
            raise ConfigError(f"{where}: unknown launcher {name!r}; a block for one of: {', '.join(OPTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{where}.{name} must be a mapping of options, got {values!r}")
        out[name] = check_options(name, {str(k): v for k, v in values.items()}, lambda k, n=name: f"{where}.{n}.{k}")
    return out


def split_launcher_args(argv: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Take ``--slurm.KEY VALUE`` / ``--slurm.KEY=VALUE`` (and ``--ray.``) out of ``argv``.

    Returns the other arguments (for argparse) and the options per launcher, values read as YAML.
    They are taken out before argparse runs because their keys are open-ended, and a value
    left to argparse could be taken for the sweep file.
    """
    rest: list[str] = []
    found: dict[str, dict[str, Any]] = {}
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        name = item[2:].split(".", 1)[0] if item.startswith("--") and "." in item else ""
        if name not in OPTIONS:
            rest.append(item)
            i += 1
            continue
        key, sep, text = item[len(name) + 3 :].partition("=")
        if not sep:
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise ConfigError(f"--{name}.{key} needs a value, e.g. --{name}.{key} VALUE")
            text = items[i + 1]
            i += 1
        i += 1
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        found.setdefault(name, {})[key] = value
    for name, values in found.items():
        found[name] = check_options(name, values, lambda k, n=name: f"--{n}.{k}")
    return rest, found


def resolve(launcher: str, from_file: Mapping[str, Mapping[str, Any]], from_cli: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults, then the sweep file's block, then the command line."""
    if launcher not in OPTIONS:
        return {}
    values = {key: option.default for key, option in OPTIONS[launcher].items()}
    return {**values, **dict(from_file.get(launcher) or {}), **dict(from_cli)}
