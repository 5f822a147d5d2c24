"""Framework overhead: our LightningModule + Trainer vs a plain PyTorch loop.

Trains the same VGG-BN (same init, data, batch size, optimizer) for the same number of
steps both ways, alternating the two a few times, and prints steps/s and the ratio
ours / plain (target >= 0.9 on CPU). Both use the embedded CIFAR-10 and the same
in-memory DataLoader; Lightning runs with checkpointing, logging and the progress bar
off to time the training loop itself.

    python benchmarks/framework_overhead.py --steps 40 --width 0.25 --repeats 3
"""

from __future__ import annotations

import argparse
import time
import warnings

import pytorch_lightning as pl
import torch

from lightning_bn import VGG, EmbeddedCIFAR10DataModule


def _model(width: float) -> VGG:
    torch.manual_seed(0)
    return VGG(width=width, norm="batch", lr=0.05, momentum=0.9, weight_decay=5e-4)


def run_lightning(dm: EmbeddedCIFAR10DataModule, steps: int, width: float) -> float:
    model = _model(width)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    return steps / (time.perf_counter() - start)


def run_plain(dm: EmbeddedCIFAR10DataModule, steps: int, width: float) -> float:
    model = _model(width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    start = time.perf_counter()
    done = 0
    while done < steps:
        for x, y in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    dm = EmbeddedCIFAR10DataModule(batch_size=args.batch_size)
    dm.setup("fit")
    run_plain(dm, 3, args.width)  # warm-up: first-call allocations, thread pools
    ours, plain = [], []
    for _ in range(args.repeats):
        plain.append(run_plain(dm, args.steps, args.width))
        ours.append(run_lightning(dm, args.steps, args.width))
    best_ours, best_plain = max(ours), max(plain)
    print(f"VGG-11 width {args.width} BN, batch {args.batch_size}, {args.steps} steps, best of {args.repeats}")
    print(f"plain PyTorch loop : {best_plain:6.2f} steps/s")
    print(f"LightningModule    : {best_ours:6.2f} steps/s")
    print(f"ratio ours / plain : {best_ours / best_plain:.3f}  (target >= 0.9)")


if __name__ == "__main__":
    main()
