"""Sweeps: a grid of LightningCLI runs from one YAML file, resumable, sequential or parallel.

``python -m lightning_bn.sweep configs/experiments/<name>.yaml`` (see ``__main__``), or from
Python::

    from lightning_bn.sweep import load_sweep, expand
    spec = load_sweep("configs/experiments/vgg_norm_lr.yaml")
    for run in expand(spec):
        print(run.name, run.options)

The file format is documented in docs/experiments.md and in :mod:`lightning_bn.sweep.spec`.
"""

from lightning_bn.sweep.commands import option_args, run_dir, stage_args
from lightning_bn.sweep.expand import Run, expand
from lightning_bn.sweep.runner import SweepRunner
from lightning_bn.sweep.spec import SweepSpec, build_spec, load_sweep
from lightning_bn.sweep.state import Plan, plan, read_record

__all__ = [
    "Plan",
    "Run",
    "SweepRunner",
    "SweepSpec",
    "build_spec",
    "expand",
    "load_sweep",
    "option_args",
    "plan",
    "read_record",
    "run_dir",
    "stage_args",
]
