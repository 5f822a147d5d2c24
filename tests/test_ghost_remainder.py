"""ghost_batch on batches its virtual_batch_size does not divide (issue 16).

Rule: consecutive virtual batches of v samples; the remainder forms its own, smaller one;
a remainder of one sample joins the previous virtual batch; a batch smaller than v is one
virtual batch. The references apply torch.nn.functional.batch_norm to each chunk by hand.
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.models.mlp import MLP
from lightning_bn.norm import create_norm
from lightning_bn.norm.ghost import split_virtual_batches
from tests._tiny_modules import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# batch size -> virtual batch sizes for v = 4, by the rule above
CHUNKS = {7: [4, 3], 8: [4, 4], 9: [4, 5], 10: [4, 4, 2], 13: [4, 4, 5], 2: [2], 3: [3], 5: [5], 6: [4, 2]}


def reference(x, weight, bias, running, sizes, momentum=0.1, eps=1e-5):
    """F.batch_norm on each chunk; running stats move towards the plain average of the chunks' statistics."""
    outs, means, variances = [], [], []
    for chunk in x.split(sizes):
        m, v = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
        outs.append(F.batch_norm(chunk, m, v, weight, bias, True, 1.0, eps))
        means.append(m), variances.append(v)
    mean, var = running
    new_mean = (1 - momentum) * mean + momentum * torch.stack(means).mean(0)
    new_var = (1 - momentum) * var + momentum * torch.stack(variances).mean(0)
    return torch.cat(outs), (new_mean, new_var)


@pytest.mark.parametrize("n, sizes", sorted(CHUNKS.items()))
def test_split_follows_the_remainder_rule(n, sizes):
    full, last = split_virtual_batches(n, 4)
    assert [4] * full + ([last] if last else []) == sizes


@pytest.mark.parametrize("shape_rest", [(), (3, 2)], ids=["NC", "NCHW"])
@pytest.mark.parametrize("n", [7, 9, 10, 13, 2, 6])
def test_remainder_matches_batch_norm_per_chunk(n, shape_rest):
    """Outputs, input and parameter gradients, and running statistics over two steps."""
    torch.manual_seed(n)
    c = 3
    ghost = create_norm("ghost_batch", c, virtual_batch_size=4).double()
    with torch.no_grad():
        ghost.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        ghost.bias.copy_(torch.tensor([0.1, 0.0, -0.1]))
    weight = ghost.weight.detach().clone().requires_grad_()
    bias = ghost.bias.detach().clone().requires_grad_()
    running = (torch.zeros(c, dtype=torch.double), torch.ones(c, dtype=torch.double))
    scale = torch.arange(1, n + 1, dtype=torch.double).view(n, 1, *[1] * len(shape_rest))  # chunks differ
    for _ in range(2):
        x = (torch.randn(n, c, *shape_rest, dtype=torch.double) * scale).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y = ghost(x)
        y_ref, running = reference(x_ref, weight, bias, running, CHUNKS[n])
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, (x, ghost.weight, ghost.bias), g)
        grads_ref = torch.autograd.grad(y_ref, (x_ref, weight, bias), g)
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(ghost.running_mean, running[0])
        torch.testing.assert_close(ghost.running_var, running[1])
    assert int(ghost.num_batches_tracked) == 2


def test_one_sample_behaves_as_torch_batch_norm():
    """A batch of one: torch's own error without spatial dims, BatchNorm's output with them."""
    ghost = create_norm("ghost_batch", 3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        ghost(torch.randn(1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.BatchNorm1d(3)(torch.randn(1, 3))
    x = torch.randn(1, 3, 2, 2)
    bn = torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(ghost(x), bn(x))
    torch.testing.assert_close(ghost.running_mean, bn.running_mean)
    torch.testing.assert_close(ghost.running_var, bn.running_var)


def test_setup_check_warns_instead_of_raising():
    ghost = create_norm("ghost_batch", 3, virtual_batch_size=4)
    with pytest.warns(
        UserWarning, match="data.batch_size=10 is not a multiple of norm 'ghost_batch' virtual_batch_size=4"
    ):
        ghost.check_batch_size(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ghost.check_batch_size(12)


def test_example_input_array_of_two_in_train_mode():
    model = MLP(hidden_sizes=[8], input_shape=[1, 4, 4], norm="ghost_batch", norm_kwargs={"virtual_batch_size": 4})
    model.train()
    assert model.example_input_array.shape[0] == 2
    assert model(torch.randn_like(model.example_input_array)).shape == (2, 10)


class _Data(pl.LightningDataModule):
    """14 samples in batches of 6 with drop_last=False: batches of 6, 6 and a last partial 2."""

    batch_size = 6

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.randn(14, 1, 4, 4), torch.randint(0, 10, (14,)))
        return DataLoader(data, batch_size=self.batch_size, drop_last=False)


def test_lightning_fit_with_last_partial_batch():
    model = MLP(hidden_sizes=[8], input_shape=[1, 4, 4], norm="ghost_batch", norm_kwargs={"virtual_batch_size": 4})
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="data.batch_size=6 is not a multiple of norm 'ghost_batch'"):
        trainer.fit(model, _Data())
    assert trainer.global_step == 6  # 3 batches per epoch, the last one of 2 samples
    ghost = model.features[2]
    assert int(ghost.num_batches_tracked) == 6
    assert torch.isfinite(ghost.running_var).all()
