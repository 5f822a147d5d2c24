"""KeskarSharpnessCallback in a real fit, against phi recomputed by hand on a copy of the model.

The maximizers themselves are checked against closed forms and a brute-force grid in
tests/test_keskar_math.py; here: the callback evaluates the right f (the loss over its fixed
sample, BN in eval mode, at the final parameters), builds the right box and subspace,
logs the right keys, and leaves training untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call

from callbacks import KeskarSharpnessCallback
from callbacks.hvp import flatten, unflatten
from callbacks.keskar_math import RandomSubspace, keskar_sharpness
from tests._tiny_modules import RecordingLogger, TinyClassifier, classification_loader, make_trainer

pytestmark = pytest.mark.filterwarnings("error::callbacks.MeasurementWarning")


def fit(callbacks: list, steps: int = 3, **kwargs: Any) -> tuple[pl.LightningModule, RecordingLogger]:
    torch.manual_seed(0)
    module, logger = TinyClassifier(**kwargs), RecordingLogger()
    make_trainer(steps, callbacks, logger).fit(module, classification_loader(n=64, batch_size=16))
    return module, logger


def by_hand(module: pl.LightningModule, sample: list[Any], bn_mode: str = "eval"):
    """x and w -> (f(w), grad f(w)) on a deep copy: the mean cross-entropy over the sample."""
    model = copy.deepcopy(module).train(bn_mode == "train")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    like = [p.detach() for n, p in model.named_parameters() if p.requires_grad]

    def value_and_grad(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        w = w.detach().requires_grad_()
        params = dict(zip(names, unflatten(w, like)))
        loss = sum(F.cross_entropy(functional_call(model, params, (x,)), y) for x, y in sample) / len(sample)
        (grad,) = torch.autograd.grad(loss, w)
        return float(loss.detach()), grad

    return flatten(like).clone(), value_and_grad


@pytest.mark.parametrize("method, subspace_dim", [("torch", None), ("lbfgsb", 5)])
def test_logged_phi_equals_phi_recomputed_on_a_copy(method, subspace_dim):
    cb = KeskarSharpnessCallback(
        [1e-2, 5e-3], subspace_dim=subspace_dim, method=method, num_batches=2, every_n_epochs=None, seed=3
    )
    module, logger = fit([cb])
    x, value_and_grad = by_hand(module, cb.sample(module.trainer))
    subspace = None if subspace_dim is None else RandomSubspace(x.numel(), subspace_dim, seed=3)
    (step, values), *rest = [(s, m) for s, m in logger.records if "sharpness/loss" in m]
    assert not rest and step == module.trainer.global_step - 1
    suffix = "" if subspace_dim is None else f"_sub{subspace_dim}"
    assert set(values) == {
        "sharpness/loss",
        f"sharpness/keskar_eps0.01{suffix}",
        f"sharpness/keskar_eps0.01{suffix}_at_bound",
        f"sharpness/keskar_eps0.005{suffix}",
        f"sharpness/keskar_eps0.005{suffix}_at_bound",
    }
    for eps in (1e-2, 5e-3):
        reference = keskar_sharpness(value_and_grad, x, eps, subspace, method, max_iter=10)
        key = f"sharpness/keskar_eps{eps:g}{suffix}"
        assert values[key] == pytest.approx(reference.phi, rel=1e-3)
        assert values[f"{key}_at_bound"] == pytest.approx(reference.at_bound, abs=0.05)
        assert values[key] > 0 and 0 <= values[f"{key}_at_bound"] <= 1
    assert values["sharpness/loss"] == pytest.approx(reference.loss, rel=1e-6)


def test_sample_size_is_rounded_up_to_whole_batches():
    cb = KeskarSharpnessCallback(num_samples=40, max_iter=1, every_n_epochs=None)
    module, _ = fit([cb], steps=1)
    assert [len(batch[1]) for batch in cb.sample(module.trainer)] == [16, 16, 16]


def test_no_observer_effect_bit_identical_fit():
    def run(callbacks):
        torch.manual_seed(0)
        module = TinyClassifier(norm="batch", dropout=0.2, optimizer="adam")
        trainer = make_trainer(4, callbacks, RecordingLogger())
        trainer.fit(module, classification_loader(n=64, batch_size=16))
        return module, trainer, torch.get_rng_state()

    plain, plain_trainer, plain_rng = run([])
    callbacks = [
        KeskarSharpnessCallback(max_iter=2, num_batches=2, every_n_steps=1, bn_mode="train"),
        KeskarSharpnessCallback(
            subspace_dim=4, method="lbfgsb", max_iter=2, num_batches=1, every_n_steps=2, key_suffix="_lbfgsb"
        ),
    ]
    measured, trainer, rng = run(callbacks)
    assert all(cb.last_values for cb in callbacks)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), measured.state_dict().values()))
    for a, b in zip(plain_trainer.optimizers[0].state.values(), trainer.optimizers[0].state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(plain_rng, rng)


def test_two_instances_have_distinct_state_keys():
    assert KeskarSharpnessCallback().state_key != KeskarSharpnessCallback(subspace_dim=100).state_key


def test_subspace_larger_than_the_model_is_refused_at_setup():
    with pytest.raises(ValueError, match="subspace_dim=5000 exceeds"):
        fit([KeskarSharpnessCallback(subspace_dim=5000)], steps=1)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"epsilons": []}, "epsilons"),
        ({"epsilons": [1e-3, -1.0]}, "epsilons"),
        ({"subspace_dim": 0}, "subspace_dim"),
        ({"method": "adam"}, "method"),
        ({"max_iter": 0}, "max_iter"),
        ({"seed": 1.5}, "seed"),
        ({"num_batches": 0}, "num_batches"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"bn_mode": "frozen"}, "bn_mode"),
    ],
)
def test_arguments_are_checked_at_once(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KeskarSharpnessCallback(**kwargs)


def test_sample_batch_size_rebatches_the_sample_independently_of_the_training_batch_size():
    """Runs of batch 16 and 8 measure f on the same-sized batches: 20 samples -> 24 (whole
    batches of 12), the loader's samples in order; f(x) in train BN mode is the mean loss over
    those batches with their own statistics."""
    for loader_batch in (16, 8):
        cb = KeskarSharpnessCallback(
            num_samples=20, sample_batch_size=12, max_iter=1, every_n_epochs=None, bn_mode="train"
        )
        torch.manual_seed(0)
        module, logger = TinyClassifier(), RecordingLogger()
        make_trainer(1, [cb], logger).fit(module, classification_loader(n=64, batch_size=loader_batch))
        sample = cb.sample(module.trainer)
        assert [len(y) for _, y in sample] == [12, 12]
        raw = cb.training_sample(module.trainer, -(-24 // loader_batch))
        assert torch.equal(torch.cat([x for x, _ in sample]), torch.cat([x for x, _ in raw])[:24])
        x, value_and_grad = by_hand(module, sample, bn_mode="train")
        (logged,) = [m["sharpness/loss"] for _, m in logger.records if "sharpness/loss" in m]
        assert logged == pytest.approx(value_and_grad(x)[0], rel=1e-6)


def test_sample_batch_size_needs_num_samples_not_num_batches():
    message = r"KeskarSharpnessCallback: sample_batch_size must be None with num_batches=2 .*got 4"
    with pytest.raises(ValueError, match=message):
        KeskarSharpnessCallback(num_batches=2, sample_batch_size=4)


def test_two_instances_logging_the_same_keys_are_refused_and_key_suffix_separates_them():
    same = [
        KeskarSharpnessCallback(max_iter=1, num_batches=1),
        KeskarSharpnessCallback(max_iter=1, num_batches=1, bn_mode="train"),
    ]
    with pytest.raises(
        ValueError,
        match=r"KeskarSharpnessCallback \(trainer.callbacks\[\d\]\) would log sharpness/keskar_eps0.0005.*key_suffix",
    ):
        fit(same, steps=1)
    cbs = [
        KeskarSharpnessCallback([1e-2], max_iter=1, num_batches=1, every_n_epochs=None),
        KeskarSharpnessCallback(
            [1e-2], max_iter=1, num_batches=1, every_n_epochs=None, bn_mode="train", key_suffix="_train"
        ),
    ]
    _, logger = fit(cbs, steps=1)
    (final,) = [m for _, m in logger.records if "sharpness/loss" in m]
    (final_train,) = [m for _, m in logger.records if "sharpness/loss_train" in m]
    assert set(final_train) >= {"sharpness/keskar_eps0.01_train", "sharpness/keskar_eps0.01_train_at_bound"}
    assert final["sharpness/loss"] != final_train["sharpness/loss_train"]  # running vs batch statistics


@pytest.mark.parametrize("suffix", ["train", "_a/b", "_x_at_bound", 3])
def test_bad_key_suffix_is_refused(suffix):
    with pytest.raises(ValueError, match=r"KeskarSharpnessCallback: key_suffix must be ''"):
        KeskarSharpnessCallback(key_suffix=suffix)
