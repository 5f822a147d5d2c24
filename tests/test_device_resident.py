"""data.device_resident: batches made on the device in batched ops. The same images and
normalization as the per-sample path, the crop/flip of torchvision's definition, DDP shards
disjoint and complete, a resumed run continues the same sequence, and the whole thing under
Lightning (also on 2 CPU processes with DDP)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_bn.data import CIFAR10DataModule
from lightning_bn.data.base import InMemoryImageDataModule, normalize_uint8
from lightning_bn.data.device_resident import PAD, DeviceResidentLoader, random_crop_flip
from lightning_bn.errors import ConfigError

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def stub_trainer(rank: int = 0, world: int = 1, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        current_epoch=epoch,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )


def loader(n: int = 50, augment: bool = False, trainer=None, batch_size: int = 8, drop_last: bool = True):
    images = torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n)  # sample ids
    return DeviceResidentLoader(images, labels, batch_size, MEAN, STD, augment, drop_last, 7, trainer or stub_trainer())


def test_batches_are_the_normalized_images_of_the_drawn_indices():
    dl = loader()
    batches = list(dl)
    assert len(batches) == len(dl) == 50 // 8
    expected = normalize_uint8(dl.images, MEAN, STD)
    for x, ids in batches:
        torch.testing.assert_close(x, expected[ids], rtol=0, atol=1e-6)
    index, _, _ = dl.draws(0)
    assert torch.equal(torch.cat([ids for _, ids in batches]), index[:48])
    assert not torch.equal(dl.draws(1)[0], index)  # a new permutation every epoch


def test_crop_and_flip_equal_the_per_sample_definition():
    x = torch.randn(32, 3, 6, 5)
    offsets = torch.randint(0, 2 * PAD + 1, (32, 2))
    flips = torch.rand(32) < 0.5
    out = random_crop_flip(x, offsets, flips)
    for i in range(32):
        oy, ox = offsets[i].tolist()
        crop = F.pad(x[i], (PAD, PAD, PAD, PAD))[:, oy : oy + 6, ox : ox + 5]
        torch.testing.assert_close(out[i], crop.flip(-1) if flips[i] else crop, rtol=0, atol=0)


def test_augmentation_statistics():
    dl = loader(n=20_000)
    _, offsets, flips = dl.draws(3)
    assert abs(flips.float().mean().item() - 0.5) < 0.02
    assert offsets.min() == 0 and offsets.max() == 2 * PAD
    counts = torch.bincount(offsets.flatten(), minlength=2 * PAD + 1).float() / offsets.numel()
    assert torch.all((counts - 1 / (2 * PAD + 1)).abs() < 0.01)  # uniform over the 9 offsets


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shards_are_disjoint_and_cover_the_epoch(world):
    n = 50
    shards = [loader(n, trainer=stub_trainer(rank, world, epoch=2)).draws(2)[0] for rank in range(world)]
    ids = torch.cat(shards)
    assert len(set(ids.tolist())) == len(ids) == n - n % world
    assert all(len(s) == n // world for s in shards)


def test_bad_options_are_one_line():
    with pytest.raises(ConfigError, match=r"^data.num_workers=2 with data.device_resident=true"):
        CIFAR10DataModule(device_resident=True, num_workers=2)
    with pytest.raises(ConfigError, match=r"^data.device_resident must be true or false, got 'yes'"):
        CIFAR10DataModule(device_resident="yes")


class IdData(InMemoryImageDataModule):
    """n images whose pixels all equal their index (the id survives normalization), labels id % 10."""

    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self, n: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n = n

    def load_split(self, train: bool):
        ids = torch.arange(self.n, dtype=torch.uint8)
        return ids.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous(), ids.long() % 10


class Recorder(pl.LightningModule):
    """A linear model; records the ids of every training batch, per rank, to ``out``."""

    def __init__(self, out: str | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(48, 10)
        self.out, self.seen = out, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, torch.round(x[:, 0, 0, 0] * 255).long().tolist()))
        return F.cross_entropy(self.layer(x.flatten(1)), y)

    def on_train_end(self) -> None:
        if self.out is not None:
            Path(self.out, f"rank{self.global_rank}.txt").write_text(repr(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(max_steps: int, tmp_path: Path, ckpt_path: str | None = None, every: int | None = None, **kwargs) -> Recorder:
    callbacks = (
        [pl.callbacks.ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else []
    )
    trainer = pl.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=bool(every), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    module = Recorder()
    torch.manual_seed(0)
    trainer.fit(module, IdData(batch_size=8, device_resident=True, **kwargs), ckpt_path=ckpt_path)
    return module


def test_a_run_resumed_mid_epoch_continues_the_same_sequence(tmp_path):
    whole = fit(13, tmp_path, augment=True, every=11)  # 8 batches per epoch: resume at epoch 1, batch 3
    assert [e for e, _ in whole.seen] == [0] * 8 + [1] * 5
    (ckpt,) = [p for p in (tmp_path / "ckpt").iterdir() if "step=11" in p.name]
    resumed = fit(13, tmp_path, ckpt_path=str(ckpt), augment=True)
    assert resumed.seen == whole.seen[11:]


def test_image_folder_and_device_resident_train_a_cifar_model(tmp_path):
    from lightning_bn import VGG
    from tests.test_image_folder import make_tree

    make_tree(tmp_path / "cifar", {"train": 4, "test": 1}, size=32)
    data = CIFAR10DataModule(root=str(tmp_path / "cifar"), batch_size=8, device_resident=True, augment=True)
    trainer = pl.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = VGG(width=0.0625)
    trainer.fit(model, data)
    assert trainer.global_step == 3 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_on_two_cpu_processes_draws_disjoint_shards_of_one_permutation(tmp_path):
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=2, strategy="ddp_spawn",
    )  # fmt: skip
    trainer.fit(Recorder(out=str(tmp_path)), IdData(n=64, batch_size=8, device_resident=True))
    seen = [eval((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)]
    ids = [[i for _, batch in s for i in batch] for s in seen]
    assert len(ids[0]) == len(ids[1]) == 32
    assert set(ids[0]).isdisjoint(ids[1]) and set(ids[0]) | set(ids[1]) == set(range(64))


def test_device_resident_keeps_no_float_copy_of_the_training_set(tmp_path):
    """The uint8 set is what goes to the device; a float32 copy on the host would be 4x its
    size (600 MB for CIFAR-10) and never read."""
    from tests.test_image_folder import make_tree

    make_tree(tmp_path / "cifar", {"train": 2, "test": 1}, size=8)
    data = CIFAR10DataModule(root=str(tmp_path / "cifar"), batch_size=4, device_resident=True)
    data.setup("fit")
    images, _ = data._train_uint8
    assert data.train_set is None and images.dtype == torch.uint8 and data.test_set is not None
    data.setup("fit")  # idempotent: the guard is the test split, present in both modes
    assert data._train_uint8[0] is images
