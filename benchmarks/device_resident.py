"""Training throughput: data.device_resident=true vs the DataLoader path, side by side.

The same VGG-11 (BN), the same embedded CIFAR-10 with augmentation (random crop, padding 4,
horizontal flip), the same batch size and steps; the two alternate a few times and the best
steps/s of each is printed with the ratio device-resident / DataLoader. On a GPU the
DataLoader's per-sample transforms are the bottleneck the device-resident path removes; on CPU
both share the cores with the model, so expect a smaller gain.

    python benchmarks/device_resident.py                       # CPU, VGG-11 x0.25, batch 128
    python benchmarks/device_resident.py --accelerator gpu --width 1.0 --batch-size 512
"""

from __future__ import annotations

import argparse
import time
import warnings

import pytorch_lightning as pl
import torch

from lightning_bn import VGG, EmbeddedCIFAR10DataModule


class _Clock(pl.Callback):
    """Time from the end of the warm-up steps to the end of training."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps = warmup, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps = trainer.global_step - self.warmup
        self.seconds = time.perf_counter() - self.start


def steps_per_second(device_resident: bool, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = VGG(width=args.width, norm="batch", lr=0.05, momentum=0.9)
    data = EmbeddedCIFAR10DataModule(batch_size=args.batch_size, augment=True, device_resident=device_resident)
    clock = _Clock(warmup=3)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps + 3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(model, data)
    return clock.steps / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    best = {True: 0.0, False: 0.0}
    for _ in range(args.repeats):
        for resident in (False, True):
            best[resident] = max(best[resident], steps_per_second(resident, args))
    print(
        f"VGG-11 x{args.width:g}, batch {args.batch_size}, augment, {args.accelerator} "
        f"({torch.get_num_threads()} threads), best of {args.repeats}:\n"
        f"  DataLoader       {best[False]:7.2f} steps/s\n"
        f"  device-resident  {best[True]:7.2f} steps/s\n"
        f"  ratio device-resident / DataLoader = {best[True] / best[False]:.2f}"
    )


if __name__ == "__main__":
    main()
