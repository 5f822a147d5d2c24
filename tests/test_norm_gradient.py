"""NormGradientCallback in real fits against autograd on a copy of the network at W_t.

The reference: a callback keeps a deep copy of the network and the batch at every batch start;
afterwards autograd on the copy gives dL/dz at each layer's output and dL/dy = the gradient of
z with respect to y (through the layer only), with the loss scaled as Lightning scales it.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from callbacks import NormGradientCallback
from tests._tiny_modules import (  # noqa: F401  (one_thread: fixture)
    RecordingLogger,
    TinyClassifier,
    classification_loader,
    image_loader,
    make_trainer,
    one_thread,
)
from tests.test_no_observer_effect import MODELS, CompiledMLP, _assert_same_end_state, _fit_with

pytestmark = [pytest.mark.filterwarnings("error::callbacks.MeasurementWarning"), pytest.mark.usefixtures("one_thread")]


class KeepCopies(pl.Callback):
    """(global_step, copy of ``pl_module.<attr>``, batch) at every training batch start."""

    def __init__(self, attr: str = "net") -> None:
        self.attr, self.copies = attr, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = copy.deepcopy(getattr(pl_module, self.attr))
        self.copies.append((trainer.global_step, net, [t.clone() for t in batch]))


def keep_tensors(name: str, ins: dict, outs: dict):
    def hook(module, args, output):
        ins.setdefault(name, args[0])
        outs.setdefault(name, output)

    return hook


def reference(copies, layers: list[str], loss_fn, scale: float = 1.0) -> dict[int, dict[str, float]]:
    """Per step: squared norms and Lemma 4.1 terms by autograd, summed over the step's micro-batches."""
    sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for step, net, (x, y) in copies:
        ins, outs = {}, {}
        for name in layers:
            net.get_submodule(name).register_forward_hook(keep_tensors(name, ins, outs))
        loss = loss_fn(net(x), y) * scale
        grads = torch.autograd.grad(loss, [outs[n] for n in layers], retain_graph=True)
        for name, g in zip(layers, grads):
            (dy,) = torch.autograd.grad(outs[name], ins[name], grad_outputs=g, retain_graph=True)
            row = sums[step]
            row[f"{name}/in_sq"] += float(dy.double().square().sum())
            row[f"{name}/out_sq"] += float(g.double().square().sum())
            module = net.get_submodule(name)
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                yy = ins[name].detach().double()
                dims = [d for d in range(yy.dim()) if d != 1]
                var = yy.var(dims, unbiased=False, keepdim=True)
                y_hat = (yy - yy.mean(dims, keepdim=True)) / (var + module.eps).sqrt()
                m = yy.numel() // yy.shape[1]
                gd = g.double()
                c = 2 - y_hat.square().sum(dims) / m
                row[f"{name}/mean_sq"] += float((gd.sum(dims).square() / m).sum())
                row[f"{name}/scale_sq"] += float((c * (gd * y_hat).sum(dims).square() / m).sum())
                row[f"{name}/gain"] = float((module.weight.double() ** 2 / (var.reshape(-1) + module.eps)).mean())
    return sums


def fit(module, loader, callbacks, steps: int = 3, **kwargs: Any):
    torch.manual_seed(0)
    logger = RecordingLogger()
    make_trainer(steps, callbacks, logger, **kwargs).fit(module, loader)
    return logger


@pytest.mark.parametrize(("norm", "accumulate"), [("batch", 1), ("group", 1), ("batch", 2)])
def test_values_equal_autograd_on_the_training_step(norm, accumulate):
    keep = KeepCopies()
    cb = NormGradientCallback(every_n_steps=1)
    module = TinyClassifier(norm=norm)
    log = fit(module, classification_loader(n=64, batch_size=16), [keep, cb], accumulate_grad_batches=accumulate)
    layers = ["1", "4"]  # net.1 and net.4: the two norms
    expected = reference(keep.copies, layers, F.cross_entropy, scale=1.0 / accumulate)
    assert sorted(log.values("normgrad/net.1/in_norm")) == [0, 1, 2]
    for step, row in expected.items():
        for name in layers:
            key = f"normgrad/net.{name}"
            got = {
                k.removeprefix(key + "/"): v[step]
                for k in log.records[0][1]
                for v in [log.values(k)]
                if k.startswith(key)
            }
            assert got["in_norm"] == pytest.approx(row[f"{name}/in_sq"] ** 0.5, rel=1e-5)
            assert got["out_norm"] == pytest.approx(row[f"{name}/out_sq"] ** 0.5, rel=1e-5)
            assert got["ratio"] == pytest.approx((row[f"{name}/in_sq"] / row[f"{name}/out_sq"]) ** 0.5, rel=1e-5)
            if norm == "group":
                assert set(got) == {"in_norm", "out_norm", "ratio"}
                continue
            # both sides of the identity: the logged terms reproduce BN's own backward
            assert got["in_norm_lemma"] == pytest.approx(got["in_norm"], rel=1e-4)
            assert got["mean_term"] == pytest.approx(row[f"{name}/mean_sq"] / row[f"{name}/out_sq"], rel=1e-4)
            assert got["scale_term"] == pytest.approx(row[f"{name}/scale_sq"] / row[f"{name}/out_sq"], rel=1e-4)
            assert 0 < got["mean_term"] + got["scale_term"] < 1
            if accumulate == 1:
                assert got["gain"] == pytest.approx(row[f"{name}/gain"], rel=1e-5)


class ResidualBlock(pl.LightningModule):
    """conv -> y; z = BN(y); ReLU(inplace) on z; y also feeds a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def net_forward(self, x):
        y = self.conv(x)
        z = torch.relu_(self.bn(y))
        return self.head((z + y).mean((2, 3)))

    def forward(self, x):
        return self.net_forward(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_skip_connection_and_in_place_relu_see_the_layers_own_gradients():
    cb = NormGradientCallback(every_n_steps=1)
    seen = []

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((copy.deepcopy(pl_module), [t.clone() for t in batch]))

    log = fit(ResidualBlock(), image_loader(n=16, size=6, batch_size=8), [Keep(), cb], steps=2)
    for step, (module, (x, target)) in enumerate(seen):
        y = module.conv(x)
        z = module.bn(y)
        out = module.head((torch.relu(z) + y).mean((2, 3)))
        (g,) = torch.autograd.grad(F.cross_entropy(out, target), z, retain_graph=True)
        (dy,) = torch.autograd.grad(z, y, grad_outputs=g)  # through BN only, not the skip
        assert log.values("normgrad/bn/out_norm")[step] == pytest.approx(float(g.norm()), rel=1e-5)
        assert log.values("normgrad/bn/in_norm")[step] == pytest.approx(float(dy.norm()), rel=1e-5)
        assert log.values("normgrad/bn/in_norm_lemma")[step] == pytest.approx(float(dy.norm()), rel=1e-4)


def test_standard_network_placeholder_has_ratio_one():
    from lightning_bn import VGG

    cb = NormGradientCallback(every_n_steps=1)
    log = fit(VGG(norm="none", width=1 / 16, num_classes=10), image_loader(n=16, size=32, num_classes=10), [cb], 2)
    keys = {k for _, m in log.records for k in m if k.startswith("normgrad/")}
    assert keys and all(k.rsplit("/", 1)[1] in {"in_norm", "out_norm", "ratio"} for k in keys)
    ratios = [v for k in keys if k.endswith("/ratio") for v in log.values(k).values()]
    assert ratios == [1.0] * len(ratios)


@pytest.mark.parametrize("name", ["vgg-bn", "mlp-replaynoise-dropout"])
def test_no_observer_effect(name, tmp_path):
    make_model, loader = MODELS[name]
    ref = _fit_with(make_model, loader, [], tmp_path, max_steps=3)
    cb = NormGradientCallback(every_n_steps=1)
    run = _fit_with(make_model, loader, [cb], tmp_path, max_steps=3)
    assert cb.last_measured_step == 2 and any(k.endswith("/in_norm") for k in cb.last_values)
    _assert_same_end_state(run, ref, prefixes=("normgrad/",))


def test_no_observer_effect_under_accumulation(tmp_path):
    make_model, loader = MODELS["mlp-replaynoise-dropout"]
    kwargs = {"max_steps": 3, "accumulate_grad_batches": 2}
    ref = _fit_with(make_model, loader, [], tmp_path, **kwargs)
    run = _fit_with(make_model, loader, [NormGradientCallback(every_n_steps=1)], tmp_path, **kwargs)
    _assert_same_end_state(run, ref, prefixes=("normgrad/",))


@pytest.mark.slow
def test_no_observer_effect_with_a_compiled_network(tmp_path):
    _, loader = MODELS["mlp-replaynoise-dropout"]
    torch._dynamo.reset()
    ref = _fit_with(CompiledMLP, loader, [], tmp_path, max_steps=3)
    torch._dynamo.reset()
    cb = NormGradientCallback(every_n_steps=1)
    run = _fit_with(CompiledMLP, loader, [cb], tmp_path, max_steps=3)
    assert any(k.endswith("/in_norm_lemma") for k in cb.last_values)
    _assert_same_end_state(run, ref, prefixes=("normgrad/",))


def test_schedule_and_validation_forward_are_respected():
    cb = NormGradientCallback(every_n_steps=2)
    module = TinyClassifier()
    loader = classification_loader(n=64, batch_size=16)
    torch.manual_seed(0)
    log = RecordingLogger()
    make_trainer(5, [cb], log, limit_val_batches=1).fit(module, loader, loader)
    assert sorted(log.values("normgrad/net.1/ratio")) == [0, 2, 4]
    assert cb._records == [] and not cb._armed


def test_layer_without_norms_is_refused_at_setup_and_named_layers_work():
    with pytest.raises(ValueError, match="found no normalization layer"):
        fit(TinyClassifier(norm="none"), classification_loader(), [NormGradientCallback()])
    with pytest.raises(ValueError, match=r"\['net.9'\] are not modules"):
        fit(TinyClassifier(), classification_loader(), [NormGradientCallback(layers=["net.9"])])
    cb = NormGradientCallback(every_n_steps=1, layers=["net.1"])  # nn.Identity, named explicitly
    log = fit(TinyClassifier(norm="none"), classification_loader(), [cb], steps=1)
    assert log.values("normgrad/net.1/ratio") == {0: 1.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"every_n_steps": 0}, "every_n_steps"), ({"bn_mode": "eval"}, "bn_mode"), ({"layers": "net.1"}, "layers")],
)
def test_arguments_are_checked_at_once(kwargs, match):
    with pytest.raises(ValueError, match=f"NormGradientCallback: {match}"):
        NormGradientCallback(**kwargs)


def test_state_key_distinguishes_layers():
    assert NormGradientCallback(layers=["a"]).state_key != NormGradientCallback().state_key


class ShardedNormNet(pl.LightningModule):
    """Two branches with separate losses: GroupNorm (per-sample statistics: its gradients are the
    same on a shard as in the global batch) and BatchNorm (per-rank statistics). ``lr=0``."""

    def __init__(self) -> None:
        super().__init__()
        self.group = nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(2, 8), nn.Tanh(), nn.Linear(8, 3))
        self.batch = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.group(x), y) + F.cross_entropy(self.batch(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_values_are_those_of_the_global_batch(tmp_path):
    """2 ranks x batch 8 against one process x batch 16 (the same 16 samples at step 0)."""
    import csv

    torch.manual_seed(0)
    single = RecordingLogger()
    make_trainer(1, [NormGradientCallback(every_n_steps=1)], single).fit(
        ShardedNormNet(), classification_loader(n=16, batch_size=16)
    )
    torch.manual_seed(0)
    logger = pl.loggers.CSVLogger(tmp_path, name="ddp", version=0)
    trainer = make_trainer(
        1,
        [NormGradientCallback(every_n_steps=1)],
        logger,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=True,
    )
    trainer.fit(ShardedNormNet(), classification_loader(n=16, batch_size=8))
    (row,) = [
        r
        for r in csv.DictReader(open(tmp_path / "ddp" / "version_0" / "metrics.csv"))
        if r.get("normgrad/group.1/in_norm")
    ]
    for key in ("in_norm", "out_norm", "ratio"):  # GroupNorm: exactly the single-process global batch
        expected = single.values(f"normgrad/group.1/{key}")[0]
        assert float(row[f"normgrad/group.1/{key}"]) == pytest.approx(expected, rel=1e-5)
    # BatchNorm normalizes each shard: the identity holds per rank, its sums over ranks agree
    assert float(row["normgrad/batch.1/in_norm_lemma"]) == pytest.approx(
        float(row["normgrad/batch.1/in_norm"]), rel=1e-4
    )
