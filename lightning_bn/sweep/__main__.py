"""``python -m lightning_bn.sweep SWEEP.yaml``: run a grid of LightningCLI trainings.

    python -m lightning_bn.sweep configs/experiments/vgg_norm_lr.yaml              # all runs, one at a time
    python -m lightning_bn.sweep configs/experiments/vgg_norm_lr.yaml --jobs 2     # two in parallel
    python -m lightning_bn.sweep configs/experiments/vgg_norm_lr.yaml --full       # paper scale
    python -m lightning_bn.sweep configs/experiments/vgg_norm_lr.yaml --list       # index, status, name
    python -m lightning_bn.sweep configs/experiments/vgg_norm_lr.yaml --dry-run    # the training commands
    python -m lightning_bn.sweep configs/experiments/vgg_norm_lr.yaml --emit-commands > jobs.txt  # one line per run
    python -m lightning_bn.sweep configs/experiments/vgg_norm_lr.yaml --launcher slurm --slurm.partition gpu
    python -m lightning_bn.sweep configs/experiments/vgg_norm_lr.yaml --launcher ray --ray.address auto

Runs already complete are skipped; an interrupted or crashed run resumes from its last
checkpoint. See docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import yaml

from lightning_bn.errors import ArgumentParser, ConfigError
from lightning_bn.sweep.commands import display, stage_args
from lightning_bn.sweep.expand import expand
from lightning_bn.sweep.launcher import LaunchContext, Launcher, listed_status, make_launcher
from lightning_bn.sweep.options import LAUNCHER_NAMES, resolve, split_launcher_args
from lightning_bn.sweep.runner import DEFAULT_ENTRY
from lightning_bn.sweep.spec import SweepSpec, load_sweep
from lightning_bn.sweep.state import Plan, plan, write_sweep_record


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m lightning_bn.sweep",
        description="Expand a sweep file into LightningCLI runs and run them, skipping complete ones.",
    )
    parser.add_argument("sweep_file", help="YAML file with a top-level `sweep:` key (configs/experiments/)")
    parser.add_argument("--full", action="store_true", help="paper scale: apply the file's `full:` block")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="runs executed in parallel (default: 1)")
    parser.add_argument("--runs-root", default="runs", help="where runs go: <runs-root>/<name>/<run>/ (default: runs)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra option for every run (repeatable)"
    )
    parser.add_argument("--only", action="append", default=[], metavar="RUN", help="run only this run (repeatable)")
    parser.add_argument("--index", type=int, help="run only the run with this index (see --list): job arrays")
    parser.add_argument("--rerun-changed", action="store_true", help="re-run complete runs whose options changed")
    parser.add_argument("--gpus-per-job", type=int, default=0, help="give each parallel job its own K GPUs")
    parser.add_argument("-q", "--quiet", action="store_true", help="don't echo training output (with --jobs 1)")
    parser.add_argument(
        "--launcher",
        choices=LAUNCHER_NAMES,
        default="local",
        help="where runs execute: this machine (default), a SLURM job array (submitit), a Ray cluster; "
        "their options: --slurm.KEY VALUE, --ray.KEY VALUE or the sweep file's launcher: block (docs/experiments.md)",
    )
    show = parser.add_mutually_exclusive_group()
    show.add_argument("--list", action="store_true", help="print index, status and name of every run; run nothing")
    show.add_argument("--dry-run", action="store_true", help="print the training commands that would run")
    show.add_argument(
        "--emit-commands", action="store_true", help="print one sweep command per unfinished run, for a scheduler"
    )
    return parser


def parse_set(items: Sequence[str]) -> dict[str, object]:
    """``["trainer.devices=2", ...]`` -> ``{"trainer.devices": 2}`` (values read as YAML)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.max_epochs=3")
        out[key.strip()] = yaml.safe_load(value) if value else ""
    return out


def _sweep_command(args: argparse.Namespace, only: str | None = None) -> str:
    parts = ["python", "-m", "lightning_bn.sweep", args.sweep_file]
    if args.full:
        parts.append("--full")
    if args.runs_root != "runs":
        parts += ["--runs-root", args.runs_root]
    for item in args.set:
        parts += ["--set", item]
    if only is None and args.launcher != "local":  # one emitted command runs one run here, by design
        parts += ["--launcher", args.launcher]
        for key, value in args.launcher_options.get(args.launcher, {}).items():
            parts += [f"--{args.launcher}.{key}", json.dumps(value) if not isinstance(value, str) else value]
    if only is not None:
        parts += ["--only", only]
    return shlex.join(parts)


def check_runs(
    spec: SweepSpec,
    plans: Sequence[Plan],
    runs_root: str | Path,
    *,
    set_items: Sequence[str] = (),
    remote: bool = False,
) -> None:
    """Every grid value once through the training CLI (parsed and built, nothing trained): a bad
    option stops the sweep before any run starts, with one line naming the ``--set`` item or the
    run, and the option. ``remote``: the runs execute elsewhere, so this machine's lack of a GPU
    is no mistake (the check builds the Trainer on the CPU; keys and values are still checked)."""
    from lightning_bn.cli import check

    chosen, seen = [], set()
    for p in plans:
        pairs = {(k, json.dumps(v, sort_keys=True, default=str)) for k, v in p.run.values.items()}
        if p.to_execute and not pairs <= seen:
            chosen.append(p.run)
            seen |= pairs
    hardware = ["--trainer.accelerator=cpu", "--trainer.devices=1"] if remote else []
    for run in chosen:
        try:
            check([*stage_args(spec, run, spec.command, runs_root)[1:], *hardware])  # without the subcommand
        except ConfigError as err:
            raise ConfigError(f"{_culprit(str(err), set_items, run.name)}: {err}") from None


def _culprit(message: str, set_items: Sequence[str], run_name: str) -> str:
    """``--set KEY=VALUE`` when the refused option is one given with --set (it applies to every
    run, so naming a run would mislead), else ``run NAME``."""

    def plain(key: str) -> str:  # model.init_args.lr, model.lr and trainer.callbacks[1].x alike
        return re.sub(r"\[\d+\]", "", key.replace(".init_args.", ".")).strip()

    option = plain(re.split(r"[ :]", message, maxsplit=1)[0])
    for item in set_items:
        if plain(item.partition("=")[0]) == option:
            return f"--set {item}"
    return f"run {run_name}"


def main(argv: Sequence[str] | None = None, *, entry: Sequence[str] = DEFAULT_ENTRY, out: TextIO | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 a run failed, 2 bad input, 130 interrupted)."""
    out = out if out is not None else sys.stdout
    parser = build_parser()
    try:
        rest, launcher_options = split_launcher_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    args = parser.parse_args(rest)
    args.launcher_options = launcher_options
    try:
        for name in launcher_options:
            if name != args.launcher:
                raise ConfigError(
                    f"--{name}.* options are given but the launcher is {args.launcher}; add --launcher {name}"
                )
        spec = load_sweep(args.sweep_file, full=args.full, extra_overrides=parse_set(args.set))
        runs = expand(spec)
        selected = runs
        if args.only:
            unknown = [name for name in args.only if name not in {r.name for r in runs}]
            if unknown:
                raise ConfigError(f"--only {unknown[0]!r} is not a run of {spec.name}; see --list")
            selected = [r for r in runs if r.name in args.only]
        if args.index is not None:
            if not 0 <= args.index < len(runs):
                raise ConfigError(f"--index {args.index} is out of range: {spec.name} has runs 0..{len(runs) - 1}")
            selected = [r for r in selected if r.index == args.index]
        if isinstance(args.jobs, bool) or args.jobs < 1:  # before the launcher: --jobs 0 is wrong everywhere
            raise ConfigError(f"jobs must be an integer >= 1, got {args.jobs!r}")
        context = LaunchContext(
            spec,
            args.runs_root,
            entry=None if tuple(entry) == DEFAULT_ENTRY else tuple(entry),
            out=out,
            sweep_command=_sweep_command(args),
            echo=args.jobs == 1 and not args.quiet,
        )
        options = resolve(args.launcher, spec.launcher, launcher_options.get(args.launcher, {}))
        launcher = make_launcher(args.launcher, context, options, jobs=args.jobs, gpus_per_job=args.gpus_per_job)
    except ConfigError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    plans = [plan(spec, run, args.runs_root, rerun_changed=args.rerun_changed) for run in selected]

    if args.list:
        for p in plans:
            out.write(f"{p.run.index}\t{listed_status(p)}\t{p.run.name}\n")
        return 0
    if args.emit_commands:
        for p in plans:
            if p.to_execute:
                out.write(_sweep_command(args, only=p.run.name) + "\n")
        return 0
    if args.dry_run:
        for p in plans:
            out.write(f"# {p.run.name}: {p.status}{f' ({p.reason})' if p.reason else ''}\n")
            for stage in p.stages:
                resume = p.resume_from if stage == spec.command else None
                out.write(display(stage_args(spec, p.run, stage, args.runs_root, resume)) + "\n")
        return 0

    try:  # nothing is written or submitted before the launcher and every grid value are accepted
        if any(p.to_execute for p in plans):
            launcher.check()
        if tuple(entry) == DEFAULT_ENTRY:  # our own training CLI: check the options before any run starts
            check_runs(spec, plans, args.runs_root, set_items=args.set, remote=args.launcher != "local")
    except ConfigError as err:
        launcher.close()
        sys.stderr.write(f"error: {err}\n")
        return 2
    try:
        return _execute(args, spec, plans, launcher, out)
    finally:
        launcher.close()


def _execute(args: argparse.Namespace, spec: SweepSpec, plans: Sequence[Plan], launcher: Launcher, out: TextIO) -> int:
    counts = Counter(p.status for p in plans)
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    out.write(
        f"[sweep] {spec.experiment}: {len(plans)} runs ({summary}); {launcher.where()}; "
        f"logs in {Path(args.runs_root) / spec.experiment}/<run>/train.log\n"
    )
    for p in plans:
        if p.status in ("changed", "running", "blocked"):
            out.write(f"[sweep] skipping {p.run.name}: {p.reason}\n")
    try:
        write_sweep_record(spec, args.runs_root, _sweep_command(args))
    except OSError as err:  # e.g. --runs-root is a file or not writable
        sys.stderr.write(f"error: --runs-root {args.runs_root}: cannot write the sweep record ({err})\n")
        return 2
    # A cluster preempting the job sends SIGTERM: stop the trainings as cleanly as on Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        outcomes = launcher.execute(plans)
    except KeyboardInterrupt:
        return 130
    except ConfigError as err:  # the scheduler refused the submission: nothing was submitted
        sys.stderr.write(f"error: {err}\n")
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not launcher.waits:
        return 0
    failed = [o for o in outcomes if not o.ok]
    skipped = sum(1 for p in plans if not p.to_execute)
    out.write(
        f"[sweep] {spec.experiment}: {len(outcomes) - len(failed)} ran, {skipped} skipped, {len(failed)} failed\n"
    )
    if failed:
        out.write(
            "[sweep] run the same command again to retry the failed runs (they resume from their last checkpoint)\n"
        )
    return 1 if failed else 0


def _raise_interrupt(signum, frame):  # signal handler signature
    raise KeyboardInterrupt


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... --list | head` closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
