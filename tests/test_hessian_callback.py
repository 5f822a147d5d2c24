"""HessianCallback against the dense Hessian of a < 1,000-parameter model, in a real fit.

The reference: ``torch.autograd.functional.hessian`` of the mean training loss over the
callback's fixed sample, at the parameters the callback measured (the final ones), in
float64 on a copy of the model.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from callbacks import HessianCallback, MeasurementWarning
from callbacks.hessian_math import hutchinson_trace, lanczos
from callbacks.hvp import flatten, unflatten
from tests._tiny_modules import RecordingLogger, TinyClassifier, classification_loader, make_trainer

pytestmark = pytest.mark.filterwarnings("error::callbacks.MeasurementWarning")


def dense_hessian(module: pl.LightningModule, sample: list[Any], bn_mode: str) -> torch.Tensor:
    model = copy.deepcopy(module).double().train(bn_mode == "train")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    like = [p.detach() for n, p in model.named_parameters() if p.requires_grad]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, unflatten(flat, like)))
        return sum(F.cross_entropy(functional_call(model, params, (x.double(),)), y) for x, y in sample) / len(sample)

    return torch.autograd.functional.hessian(loss, flatten(like), vectorize=True)


def fit(callback: HessianCallback, epochs: int = 1, **kwargs: Any) -> tuple[pl.LightningModule, RecordingLogger]:
    torch.manual_seed(0)
    module, logger = TinyClassifier(**kwargs), RecordingLogger()
    trainer = make_trainer(-1, [callback], logger, max_epochs=epochs)
    trainer.fit(module, classification_loader(n=48, batch_size=16))
    return module, logger


@pytest.mark.parametrize(("bn_mode", "start"), [("eval", "gradient"), ("train", "gradient"), ("eval", "random")])
def test_top_eigenvalues_and_trace_equal_the_dense_hessian(bn_mode, start):
    cb = HessianCallback(
        top_k=3, max_iter=120, tol=1e-9, num_batches=3, bn_mode=bn_mode, start=start, every_n_epochs=None
    )
    module, logger = fit(cb)
    n = sum(p.numel() for p in module.parameters())
    assert n < 1000
    h = dense_hessian(module, cb.sample(module.trainer), bn_mode)
    exact = torch.linalg.eigvalsh(h).flip(0)
    (step, values), *rest = [(s, m) for s, m in logger.records if "hessian/trace" in m]
    assert not rest and step == module.trainer.global_step - 1  # measured once, at the end of training
    assert values["hessian/top_eigenvalue"] == values["hessian/eigenvalue_1"]
    got = [values[f"hessian/eigenvalue_{i}"] for i in (1, 2, 3)]
    assert got == pytest.approx(exact[:3].tolist(), rel=1e-4)
    # The same Hutchinson probes on the dense Hessian: the callback's generator draws the
    # Lanczos start vector first, then the Rademacher vectors.
    generator = torch.Generator().manual_seed(0)
    like = torch.zeros(n, dtype=torch.float64)
    lanczos(lambda v: h @ v, like, k=3, max_iter=120, tol=1e-9, generator=generator)
    reference = hutchinson_trace(lambda v: h @ v, like, max_iter=120, tol=1e-9, generator=generator)
    assert values["hessian/trace"] == pytest.approx(reference.trace, rel=1e-4)
    assert abs(values["hessian/trace"] - float(h.trace())) < 4 * values["hessian/trace_stderr"]


def test_per_layer_traces_and_eigenvalues_are_the_dense_diagonal_blocks():
    cb = HessianCallback(max_iter=100, tol=1e-9, per_layer=True, num_batches=2, every_n_epochs=None)
    module, logger = fit(cb)
    h = dense_hessian(module, cb.sample(module.trainer), "eval")
    values = logger.records[-1][1]
    start = 0
    layers = [name for name, m in module.named_modules() if list(m.parameters(recurse=False))]
    assert layers == ["net.0", "net.1", "net.3", "net.4", "net.6"]
    for layer in layers:
        size = sum(p.numel() for p in dict(module.named_modules())[layer].parameters(recurse=False))
        block = h[start : start + size, start : start + size]
        start += size
        top = float(torch.linalg.eigvalsh(block)[-1])
        assert values[f"hessian/{layer}/top_eigenvalue"] == pytest.approx(top, rel=1e-4, abs=1e-7)
    block_sum = sum(values[f"hessian/{layer}/trace"] for layer in layers)
    assert block_sum == pytest.approx(values["hessian/trace"], rel=1e-5)


def test_density_npz_figure_and_moments_against_the_dense_hessian(tmp_path):
    """SLQ in a real fit: the .npz per measurement and the figure are written, the logged
    support is the dense spectrum's, the moments estimate tr(H)/n and ||H||_F^2/n."""
    cb = HessianCallback(
        top_k=1, trace=False, density=True, density_runs=16, density_steps=30, num_batches=2, density_bins=500
    )
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    torch.manual_seed(0)
    module = TinyClassifier()
    make_trainer(-1, [cb], logger, max_epochs=1).fit(module, classification_loader(n=48, batch_size=16))
    files = sorted((tmp_path / "tb" / "version_0" / "hessian_density").glob("step_*.npz"))
    assert [f.name for f in files] == ["step_00000002.npz"]  # the epoch end (= the end of training)
    saved = np.load(files[-1])
    assert saved["nodes"].shape == saved["weights"].shape == (16, 30) and saved["density"].shape == (500,)
    assert int(saved["step"]) == 2 and int(saved["num_params"]) == sum(p.numel() for p in module.parameters())
    h = dense_hessian(module, cb.sample(module.trainer), "eval")
    n, spectrum = h.shape[0], torch.linalg.eigvalsh(h)
    nodes, weights = torch.from_numpy(saved["nodes"]), torch.from_numpy(saved["weights"])
    for power, exact in ((1, float(h.trace()) / n), (2, float(h.square().sum()) / n)):
        samples = (weights * nodes**power).sum(1)
        assert abs(float(samples.mean()) - exact) < 4 * float(samples.std()) / len(samples) ** 0.5, power
    scale = float(spectrum.abs().max())
    assert cb.last_values["hessian/spectrum_max"] == pytest.approx(float(spectrum[-1]), abs=1e-3 * scale)
    assert cb.last_values["hessian/spectrum_min"] == pytest.approx(float(spectrum[0]), abs=1e-3 * scale)
    assert cb.last_values["hessian/top_eigenvalue"] == pytest.approx(float(spectrum[-1]), rel=1e-3)
    assert 0.0 <= cb.last_values["hessian/negative_mass"] <= 1.0
    events = b"".join(f.read_bytes() for f in (tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert b"hessian/density" in events  # the figure


def test_density_off_leaves_every_other_estimate_unchanged(tmp_path):
    """The density draws its random vectors last: turning it on changes no other value."""
    common = {"top_k": 2, "max_iter": 30, "tol": 1e-6, "per_layer": True, "num_batches": 2, "every_n_epochs": None}
    _, plain = fit(HessianCallback(**common))
    with pytest.warns(MeasurementWarning, match="no TensorBoardLogger"):  # the figure needs one; the .npz not
        _, with_density = fit(HessianCallback(**common, density=True, density_steps=10, density_dir=str(tmp_path)))
    assert len(list(tmp_path.glob("step_*.npz"))) == 1
    without = plain.records[-1][1]
    assert {k: v for k, v in with_density.records[-1][1].items() if k in without and k != "hessian/num_hvps"} == {
        k: v for k, v in without.items() if k != "hessian/num_hvps"
    }
    assert with_density.records[-1][1]["hessian/num_hvps"] == without["hessian/num_hvps"] + 10


def test_power_method_matches_the_dense_largest_magnitude_eigenvalue():
    cb = HessianCallback(trace=False, method="power", max_iter=300, tol=1e-8, num_batches=2, every_n_epochs=None)
    module, logger = fit(cb)
    h = dense_hessian(module, cb.sample(module.trainer), "eval")
    spectrum = torch.linalg.eigvalsh(h)
    largest = float(spectrum[spectrum.abs().argmax()])
    assert logger.records[-1][1]["hessian/top_eigenvalue"] == pytest.approx(largest, rel=1e-3)
    assert "hessian/trace" not in logger.records[-1][1]


def test_measures_at_epoch_ends_and_once_at_the_end_of_training():
    cb = HessianCallback(max_iter=5, tol=1.0, num_batches=1)
    _, logger = fit(cb, epochs=2)  # 3 batches per epoch
    assert sorted(logger.values("hessian/top_eigenvalue")) == [2, 5]
    cb = HessianCallback(max_iter=5, tol=1.0, num_batches=1, every_n_epochs=2, at_train_end=False)
    _, logger = fit(cb, epochs=3)
    assert sorted(logger.values("hessian/top_eigenvalue")) == [5]
    cb = HessianCallback(max_iter=5, tol=1.0, num_batches=1, every_n_epochs=None, every_n_steps=2, at_train_end=True)
    _, logger = fit(cb, epochs=2)
    assert sorted(logger.values("hessian/top_eigenvalue")) == [0, 2, 4, 5]


def test_no_observer_effect_bit_identical_fit(tmp_path):
    def run(callbacks):
        torch.manual_seed(0)
        module = TinyClassifier(norm="batch", dropout=0.2)
        tensorboard = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=len(callbacks))
        trainer = make_trainer(6, callbacks, [tensorboard, RecordingLogger()])
        trainer.fit(module, classification_loader(n=48, batch_size=16))
        return module, trainer, torch.get_rng_state()

    plain, plain_trainer, plain_rng = run([])
    cb = HessianCallback(
        top_k=2,
        max_iter=12,
        tol=0.5,
        per_layer=True,
        num_batches=2,
        every_n_steps=1,
        bn_mode="train",
        density=True,
        density_steps=8,
        density_runs=2,
    )
    measured, trainer, rng = run([cb])
    assert len(list((tmp_path / "tb" / "version_1" / "hessian_density").glob("step_*.npz"))) == 6
    assert cb.last_values and cb.last_measured_step is not None
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), measured.state_dict().values()))
    for a, b in zip(plain_trainer.optimizers[0].state.values(), trainer.optimizers[0].state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in measured.parameters())
    assert torch.equal(plain_rng, rng)


def test_state_key_distinguishes_configurations():
    assert HessianCallback(top_k=1).state_key != HessianCallback(top_k=2).state_key
    assert HessianCallback(density=True).state_key != HessianCallback().state_key


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 0, "trace": False}, "nothing to measure"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": -1e-3}, "tol"),
        ({"method": "arnoldi"}, "method"),
        ({"per_layer": "yes"}, "per_layer"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 10, "num_batches": 1}, "not both"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_epochs": None, "at_train_end": False}, "nothing would be measured"),
        ({"bn_mode": "frozen"}, "bn_mode"),
        ({"start": "zeros"}, "start must be one of"),
        ({"density": 1}, "density"),
        ({"density_runs": 0}, "density_runs"),
        ({"density_steps": 1}, "density_steps"),
        ({"density_sigma_squared": 0.0}, "density_sigma_squared"),
        ({"density_bins": 1}, "density_bins"),
        ({"density_dir": 3}, "density_dir"),
    ],
)
def test_arguments_are_checked_at_once(kwargs, name):
    with pytest.raises(ValueError, match=name):
        HessianCallback(**kwargs)


def test_top_k_larger_than_the_model_is_refused_at_setup():
    with pytest.raises(ValueError, match="top_k=1000 exceeds"):
        fit(HessianCallback(top_k=1000))


class ShardedNet(pl.LightningModule):
    """GroupNorm (no batch statistics): per-rank Hessians average to the global one.

    ``lr=0``: training does not move the parameters, so a DDP run and a single-process run
    are measured at the same point whatever batches their steps drew."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(2, 8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_measures_the_hessian_of_the_global_sample(tmp_path):
    """2 ranks x 2 batches of 8 = one process x 2 batches of 16: both samples are the whole data set."""

    def callback() -> HessianCallback:
        return HessianCallback(
            top_k=2, max_iter=60, tol=1e-8, num_batches=2, every_n_epochs=None, density=True, density_steps=30
        )

    torch.manual_seed(0)
    single = RecordingLogger()
    single_trainer = make_trainer(2, [callback()], single, default_root_dir=tmp_path / "single")
    with pytest.warns(MeasurementWarning, match="no TensorBoardLogger"):
        single_trainer.fit(ShardedNet(), classification_loader(n=32, batch_size=16))
    torch.manual_seed(0)
    csv = pl.loggers.CSVLogger(tmp_path, name="ddp", version=0)
    trainer = make_trainer(2, [callback()], csv, devices=2, strategy="ddp_spawn", use_distributed_sampler=True)
    trainer.fit(ShardedNet(), classification_loader(n=32, batch_size=8))
    import csv as csv_module

    rows = [r for r in csv_module.DictReader(open(tmp_path / "ddp" / "version_0" / "metrics.csv"))]
    assert len(list((tmp_path / "ddp" / "version_0" / "hessian_density").glob("*.npz"))) == 1
    keys = ("hessian/eigenvalue_1", "hessian/eigenvalue_2", "hessian/trace")
    for key in keys + ("hessian/spectrum_min", "hessian/spectrum_max", "hessian/negative_mass"):
        (ddp,) = [float(r[key]) for r in rows if r.get(key)]
        (reference,) = single.values(key).values()
        assert ddp == pytest.approx(reference, rel=1e-4), key
