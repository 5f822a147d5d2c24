"""Training batches made on the training device, without a DataLoader (``device_resident=True``).

The uint8 training set is moved to the device once; each epoch then draws one permutation and,
with ``augment``, one crop offset (padding 4) and one flip per sample, all from a generator
seeded with ``(seed, epoch)``; every batch is indexed, normalized, cropped and flipped there in
batched tensor ops (the way the fastest CIFAR-10 trainers feed a GPU). No worker processes.

The same images, normalization and augmentation as the per-sample path (TensorImageDataset with
torchvision's RandomCrop(padding=4) + RandomHorizontalFlip: zero padding after normalization,
flip with probability 1/2); only the random draws differ.

Under DDP every rank computes the same permutation and takes its shard ``perm[rank::world]``
(after dropping the last ``n % world`` positions, as DistributedSampler with drop_last), so the
shards are disjoint and together cover the epoch. The loader is stateful (Lightning saves its
``state_dict``): a run resumed mid-epoch continues the same sequence at the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

PAD = 4


class DeviceResidentLoader:
    """Iterable of ``(images float32 (B, C, H, W), labels)`` on ``trainer.strategy.root_device``.

    Args:
        images: uint8 (N, C, H, W) training images (any device; moved once).
        labels: int64 (N,).
        batch_size: per-rank batch size.
        mean, std: per-channel normalization of images scaled to [0, 1].
        augment: random crop with padding 4 and horizontal flip.
        drop_last: drop the last incomplete batch of each epoch.
        seed: base seed of every epoch's draws (epoch e draws from ``seed`` and ``e``).
        trainer: the Trainer (epoch, rank, world size, device and, on resume, the batch reached).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool,
        drop_last: bool,
        seed: int,
        trainer: Any,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.augment, self.drop_last, self.seed = batch_size, augment, drop_last, seed
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.trainer = trainer
        self._resuming = False
        self._seed_shared = False

    # -- sizes -----------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def shard_size(self) -> int:
        return len(self.labels) // self._world()[1]

    def __len__(self) -> int:
        per_rank = self.shard_size()
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    # -- the epoch's draws -------------------------------------------------------------------
    def draws(self, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's (sample indices, crop offsets (n, 2) in [0, 2 * PAD], flips) of ``epoch``."""
        n = len(self.labels)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        perm = torch.randperm(n, generator=generator)
        offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        rank, world = self._world()
        usable = n - n % world
        return perm[:usable][rank::world], offsets[:usable][rank::world], flips[:usable][rank::world]

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        first = 0
        if self._resuming:  # the checkpoint's epoch, from the batch after the last one trained
            first = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            self._resuming = False
        if trainer is not None and trainer.world_size > 1 and not self._seed_shared:
            # without seed_everything each process has its own seed: rank 0's decides, or the
            # shards would overlap
            self.seed = int(trainer.strategy.broadcast(self.seed, src=0))
            self._seed_shared = True
        device = trainer.strategy.root_device if trainer is not None else self.images.device
        self._to(device)
        index, offsets, flips = (t.to(device) for t in self.draws(epoch))
        for b in range(first, len(self)):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.batch(index[part], offsets[part], flips[part])

    def batch(self, index: Tensor, offsets: Tensor, flips: Tensor) -> tuple[Tensor, Tensor]:
        """Normalized (and augmented) images ``index`` with their labels, in batched ops."""
        x = (self.images[index].float().div_(255.0) - self.mean) / self.std
        if self.augment:
            x = random_crop_flip(x, offsets, flips)
        return x, self.labels[index]

    def _to(self, device: torch.device) -> None:
        if self.images.device != device:  # once: the dataset stays there for every epoch
            self.images, self.labels = self.images.to(device), self.labels.to(device)
            self.mean, self.std = self.mean.to(device), self.std.to(device)

    # -- Lightning's resumable-loader interface -------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The position itself is Lightning's batch progress (it prefetches one batch ahead, so
        # a count of batches handed out would be one too far); the draws follow from the epoch.
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state.get("seed", self.seed))
        self._resuming = True


def random_crop_flip(x: Tensor, offsets: Tensor, flips: Tensor) -> Tensor:
    """Per sample: zero-pad by PAD, crop back to (H, W) at ``offsets`` (row, column), and flip
    horizontally where ``flips``; one gather for the whole batch."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
