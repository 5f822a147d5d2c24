"""Wall time of Santurkar et al.'s Fig. 1-4 at paper scale on one GPU, with every measurement.

The five distinct runs of the two paper-scale sweeps: configs/experiments/headline.yaml --full
(standard, BN and noisy BN VGG-11, lr 0.1, 40 epochs of full CIFAR-10 = 15.6k steps, with the
activation, ICS and landscape callbacks) and, from configs/experiments/vgg_norm_lr.yaml --full,
standard and BN at lr 0.5 (seed 0). Each run uses the device-resident data path
(data.device_resident=true: no DataLoader workers) and runs through the sweep command, so the
runs directory is the one the report reads. Prints each run's minutes and the total; the goal is
under 30 minutes for the five on one H100-class GPU.

    python benchmarks/paper_scale.py --root DIR_WITH_CIFAR10 --runs-root runs_paper_scale
    python benchmarks/paper_scale.py --root data --precision bf16-mixed --channels-last   # tensor cores

DIR_WITH_CIFAR10: torchvision's cifar-10-batches-py (downloaded when online) or the
image-folder layout (train/<class>/*.jpg, test/<class>/*).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

RUNS = [
    ("configs/experiments/headline.yaml", [f"norm={n},seed=0" for n in ("standard", "batch_norm", "noisy_batch_norm")]),
    ("configs/experiments/vgg_norm_lr.yaml", ["norm=none,lr=0.5,seed=0", "norm=batch,lr=0.5,seed=0"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data", help="CIFAR-10 directory (data.init_args.root)")
    parser.add_argument("--runs-root", default="runs_paper_scale")
    parser.add_argument("--precision", default="32-true", help="trainer.precision, e.g. bf16-mixed")
    parser.add_argument(
        "--channels-last", action="store_true", help="model.channels_last=true (NHWC convolutions; best with bf16)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        message = "benchmarks/paper_scale.py: needs a CUDA GPU (none found); --dry-run prints the commands"
        print(message, file=sys.stderr)
        return 2
    extra = [
        "--set", "data.init_args.device_resident=true",
        "--set", f"data.init_args.root={args.root}",
        "--set", "trainer.accelerator=gpu",
        "--set", f"trainer.precision={args.precision}",
    ]  # fmt: skip
    if args.channels_last:
        extra += ["--set", "model.init_args.channels_last=true"]
    total = 0.0
    for sweep, names in RUNS:
        for name in names:
            command = [sys.executable, "-m", "lightning_bn.sweep", sweep, "--full", "--runs-root", args.runs_root]
            command += [*extra, "--only", name]
            if args.dry_run:
                print(" ".join(command))
                continue
            start = time.perf_counter()
            result = subprocess.run(command, check=False)
            minutes = (time.perf_counter() - start) / 60
            total += minutes
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
            print(f"{sweep} {name}: {minutes:.1f} min, {status}", flush=True)
    if not args.dry_run:
        name = torch.cuda.get_device_name(0)
        print(f"total for the 5 paper-scale runs on one {name}: {total:.1f} min (goal < 30)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
