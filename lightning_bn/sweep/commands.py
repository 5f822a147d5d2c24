"""The LightningCLI command lines of a run, and where the run writes.

A run of experiment ``E`` (the sweep name, ``E-full`` at paper scale) lives in
``<runs root>/E/<run name>/``: TensorBoardLogger's ``save_dir``/``name``/``version`` are set
to exactly these three parts, so the event files, ``checkpoints/`` and ``config.yaml`` of
the run land there. A ``then`` stage (``test`` after ``fit``) loads ``checkpoints/last.ckpt``
and logs into the ``<stage>/`` sub-directory, which keeps the fit's ``config.yaml``.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from lightning_bn.sweep.expand import Run
from lightning_bn.sweep.spec import SweepSpec

DISPLAY_ENTRY = ("python", "-m", "lightning_bn")
CHECKPOINT_CALLBACK = "pytorch_lightning.callbacks.ModelCheckpoint"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


def cli_value(value: Any) -> str:
    """A YAML-readable text for a value, as jsonargparse parses command-line values."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def run_dir(spec: SweepSpec, run: Run, runs_root: str | Path) -> Path:
    return Path(runs_root) / spec.experiment / run.name


def option_args(spec: SweepSpec, run: Run) -> list[str]:
    """What makes the run what it is: base configs and options. Stored in run.json to tell
    whether a finished run still matches the sweep file."""
    args = []
    for config in spec.base_configs:
        args += ["--config", config]
    return args + [f"--{key}={cli_value(value)}" for key, value in run.options.items()]


def stage_args(
    spec: SweepSpec, run: Run, stage: str, runs_root: str | Path, resume_from: str | Path | None = None
) -> list[str]:
    """Arguments of ``python -m lightning_bn`` for one stage of a run."""
    args = [stage, *option_args(spec, run)]
    args += [
        f"--trainer.logger.init_args.save_dir={runs_root}",
        f"--trainer.logger.init_args.name={spec.experiment}",
        f"--trainer.logger.init_args.version={run.name}",
    ]
    if stage == spec.command:
        if stage == "fit" and spec.checkpoint:
            args += [f"--trainer.callbacks+={CHECKPOINT_CALLBACK}", "--trainer.callbacks.save_last=true"]
            if spec.checkpoint_every_n_steps:
                args.append(f"--trainer.callbacks.every_n_train_steps={spec.checkpoint_every_n_steps}")
        if resume_from is not None:
            args.append(f"--ckpt_path={resume_from}")
    else:
        args += [
            f"--trainer.logger.init_args.sub_dir={stage}",
            f"--ckpt_path={run_dir(spec, run, runs_root) / LAST_CHECKPOINT}",
        ]
    return args


def display(args: list[str]) -> str:
    """The shell command a user can paste (``python -m lightning_bn ...``)."""
    return shlex.join([*DISPLAY_ENTRY, *args])
