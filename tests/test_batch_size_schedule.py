"""data.batch_size_schedule (Keskar's warm start): the training loader's batch size per epoch,
the iterates carried over, and the one-line refusals."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_bn.data import FashionMNISTDataModule
from lightning_bn.errors import ConfigError
from tests.test_data_synthetic_mnist import write_mnist


class BatchSizes(pl.Callback):
    def __init__(self) -> None:
        self.sizes: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.setdefault(trainer.current_epoch, set()).add(len(batch[1]))


def test_the_loader_switches_batch_size_at_the_scheduled_epoch_and_training_continues(tmp_path):
    write_mnist(tmp_path, n_train=64, n_test=16)
    from lightning_bn import MLP

    data = FashionMNISTDataModule(root=str(tmp_path), batch_size=8, batch_size_schedule={2: 32})
    seen = BatchSizes()
    trainer = pl.Trainer(
        max_epochs=4,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[seen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    torch.manual_seed(0)
    trainer.fit(MLP(hidden_sizes=[8]), data)
    assert seen.sizes == {0: {8}, 1: {8}, 2: {32}, 3: {32}}
    assert trainer.global_step == 2 * 8 + 2 * 2  # 64 samples: 8 steps per epoch, then 2


def test_schedule_without_reloading_is_refused_in_one_line(tmp_path):
    write_mnist(tmp_path, n_train=64, n_test=16)
    from lightning_bn import MLP

    data = FashionMNISTDataModule(root=str(tmp_path), batch_size=8, batch_size_schedule={1: 32})
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(
        ConfigError,
        match=r"^data.batch_size_schedule=\{1: 32\} needs trainer.reload_dataloaders_every_n_epochs=1.*got 0$",
    ):
        trainer.fit(MLP(hidden_sizes=[8]), data)


@pytest.mark.parametrize("schedule", [{-1: 8}, {1: 0}, {"a": 8}, {1: 2.5}, [1, 2]])
def test_bad_schedules_are_refused(schedule):
    """(A JSON key "2" is epoch 2: test_string_epochs_from_json_are_read_as_integers.)"""
    with pytest.raises(ConfigError, match=r"^data.batch_size_schedule must map epochs"):
        FashionMNISTDataModule(batch_size=8, batch_size_schedule=schedule)


def test_scheduled_batch_size_larger_than_the_data_is_refused(tmp_path):
    write_mnist(tmp_path, n_train=64, n_test=16)
    data = FashionMNISTDataModule(root=str(tmp_path), batch_size=8, batch_size_schedule={1: 100})
    with pytest.raises(ConfigError, match=r"data.batch_size_schedule\[1\]=100 exceeds the 64 training samples"):
        data.setup("fit")


def test_string_epochs_from_json_are_read_as_integers():
    assert FashionMNISTDataModule(batch_size=8, batch_size_schedule={"2": 32, "10": 64}).batch_size_schedule == {
        2: 32,
        10: 64,
    }
