import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn import VGG


def _fit(model, steps=8):
    data = TensorDataset(torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, DataLoader(data, batch_size=4))
    return trainer


def test_default_optimizer_is_sgd_with_the_typed_arguments():
    model = VGG(width=0.125, lr=0.02, momentum=0.8, weight_decay=1e-3, nesterov=True)
    optimizer = model.configure_optimizers()
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.02, 0.8, 1e-3, True)


@pytest.mark.parametrize(
    "schedule, factors",
    [
        ("constant", {0: 1.0, 4: 1.0, 7: 1.0, 8: 1.0}),
        ("cosine", {0: 1.0, 4: 0.5, 8: 0.0}),
        ("step", {0: 1.0, 3: 1.0, 4: 0.1, 5: 0.1, 6: 0.01, 8: 0.01}),
    ],
)
def test_lr_schedules_follow_their_formula(schedule, factors):
    model = VGG(width=0.125, lr=0.1, lr_schedule=schedule)
    trainer = _fit(model, steps=8)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * factors[8], abs=1e-12)
    if schedule == "constant":
        assert not trainer.lr_scheduler_configs
        return
    (config,) = trainer.lr_scheduler_configs
    assert config.interval == "step"
    factor = config.scheduler.lr_lambdas[0]
    for step, expected in factors.items():
        assert factor(step) == pytest.approx(expected, abs=1e-12)


def test_training_reduces_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = VGG(width=0.125, norm="batch", lr=0.05)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    before = torch.nn.functional.cross_entropy(model(x), y).item()
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(model, data)
    model.train()
    after = torch.nn.functional.cross_entropy(model(x), y).item()
    assert after < 0.5 * before
