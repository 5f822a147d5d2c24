"""Theorem 4.2's quadratic forms (NormCurvatureCallback) against dense Hessians of tiny networks.

The reference: the loss as an explicit function of one layer's input y (the layer's input
replaced by a flat vector) and of its output z, differentiated twice by
``torch.autograd.functional`` into full Hessians, the layer's full Jacobian J and the Hessian of
<g_z, f(y)>; the callback's values must equal the quadratic forms of those matrices.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian, jacobian

from callbacks import MeasurementWarning, NormCurvatureCallback
from callbacks.norm_curvature_math import COLUMNS, activation_variables, quadratic_forms
from tests._tiny_modules import (  # noqa: F401  (one_thread: fixture)
    RecordingLogger,
    TinyClassifier,
    classification_loader,
    image_loader,
    make_trainer,
    one_thread,
)
from tests.test_no_observer_effect import MODELS, _assert_same_end_state, _fit_with
from tests.test_norm_gradient import KeepCopies  # (global_step, copy of pl_module.net, batch) at W_t

pytestmark = [pytest.mark.filterwarnings("error::callbacks.MeasurementWarning"), pytest.mark.usefixtures("one_thread")]


def dense_forms(net: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor, loss_fn) -> dict[str, float]:
    """The quadratic forms of layer ``layer`` from dense matrices (float64, train-mode copies)."""
    net = copy.deepcopy(net).double()
    x = x.double() if x.is_floating_point() else x
    module = net.get_submodule(layer)
    seen = {}
    handle = module.register_forward_hook(lambda m, a, out: seen.update(y=a[0].detach(), z=out.detach()))
    net(x)
    handle.remove()
    y0, z0 = seen["y"], seen["z"]

    def replaced(hook_kind: str, value: torch.Tensor) -> torch.Tensor:
        if hook_kind == "input":
            handle = module.register_forward_pre_hook(lambda m, a: (value.reshape(y0.shape),))
        else:
            handle = module.register_forward_hook(lambda m, a, out: value.reshape(z0.shape).clone())
        try:
            return loss_fn(net(x), target)
        finally:
            handle.remove()

    def of_y(v):
        return replaced("input", v)

    def of_z(v):
        return replaced("output", v)

    def layer_fn(v):
        return copy.deepcopy(module)(v.reshape(y0.shape)).reshape(-1)  # a copy: BN updates its statistics

    y, z = y0.reshape(-1), z0.reshape(-1)
    g_y, g_z = jacobian(of_y, y), jacobian(of_z, z)
    h_y, h_z, j = hessian(of_y, y), hessian(of_z, z), jacobian(layer_fn, y)
    jv = j @ g_y
    second = hessian(lambda v: (g_z * layer_fn(v)).sum(), y)
    dense_forms.last = {"g_y": g_y.reshape(y0.shape), "jv": jv.reshape(z0.shape)}  # for a closer look
    return {
        "quad_in": float(g_y @ h_y @ g_y),
        "quad_out": float(g_z @ h_z @ g_z),
        "quad_chain": float(jv @ h_z @ jv),
        "norm_term": float(g_y @ second @ g_y),
        "in_sq": float(g_y @ g_y),
        "out_sq": float(g_z @ g_z),
    }


class Net(nn.Module):
    """linear/conv -> norm -> ReLU(inplace) or tanh -> head: curvature from the norm and the head."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        conv = norm in ("batch2d", "group2d")
        self.first = nn.Conv2d(2, 4, 3, padding=1) if conv else nn.Linear(3, 4)
        self.norm = {
            "batch1d": lambda: nn.BatchNorm1d(4),
            "batch2d": lambda: nn.BatchNorm2d(4),
            "group2d": lambda: nn.GroupNorm(2, 4),
            "layer": lambda: nn.LayerNorm(4),
            "identity": nn.Identity,
        }[norm]()
        self.act = nn.ReLU(inplace=True) if conv else nn.Tanh()
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.norm.parameters():
                p.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm(self.first(x)))
        return self.head(h.mean((2, 3)) if h.dim() == 4 else h)


@pytest.mark.parametrize("norm", ["batch1d", "batch2d", "group2d", "layer", "identity"])
def test_quadratic_forms_equal_the_dense_hessians(norm):
    torch.manual_seed(0)
    net = Net(norm).double()
    x = torch.randn(6, 2, 3, 3, dtype=torch.float64) if norm.endswith("2d") else torch.randn(6, 3, dtype=torch.float64)
    target = torch.randint(0, 3, (6,))
    for p in net.parameters():
        p.requires_grad_(False)
    with activation_variables({"norm": net.norm}) as recorder, torch.enable_grad():
        table = quadratic_forms(F.cross_entropy(net(x), target), recorder.calls)
    got = dict(zip(COLUMNS, table[0].tolist()))
    expected = dense_forms(net, "norm", x, target, F.cross_entropy)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key
    assert got["quad_in"] == pytest.approx(got["quad_chain"] + got["norm_term"], rel=1e-9)
    assert got["calls"] == 1
    if norm == "identity":  # the standard network: J = I, the layer adds no curvature
        assert got["quad_chain"] == pytest.approx(got["quad_in"], rel=1e-12) and got["norm_term"] == 0
        assert got["quad_in"] == pytest.approx(got["quad_out"], rel=1e-12)
    if norm.startswith("batch"):
        assert got["bn_calls"] == 1
        # the paper's closed form of BN's own term, exact up to BN's eps / (sigma^2 + eps)
        assert got["norm_term_paper"] == pytest.approx(got["norm_term"], rel=1e-3)
        assert got["norm_term"] != 0
    else:
        assert got["bn_calls"] == 0 and got["norm_term_paper"] == 0


def test_the_papers_closed_form_is_exact_without_eps():
    torch.manual_seed(1)
    net = Net("batch1d").double()
    net.norm.eps = 1e-300  # torch refuses 0; sigma^2 + 1e-300 rounds to sigma^2 in float64
    x, target = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    for p in net.parameters():
        p.requires_grad_(False)
    with activation_variables({"norm": net.norm}) as recorder, torch.enable_grad():
        got = dict(zip(COLUMNS, quadratic_forms(F.cross_entropy(net(x), target), recorder.calls)[0].tolist()))
    assert got["norm_term_paper"] == pytest.approx(got["norm_term"], rel=1e-9)
    # and quad_chain is (gamma/sigma)^2 g_y^T H_zz g_y: J g_y = (gamma/sigma) g_y per unit
    expected = dense_forms(net, "norm", x, target, F.cross_entropy)
    sigma = net.first(x).var(0, unbiased=False).sqrt()
    scaled = dense_forms.last["g_y"] * (net.norm.weight / sigma)
    assert torch.allclose(dense_forms.last["jv"], scaled, rtol=1e-9, atol=1e-15)
    assert got["quad_chain"] == pytest.approx(expected["quad_chain"], rel=1e-9)


# -- in a fit -----------------------------------------------------------------------------------


def fit(module, loader, callbacks, steps: int = 3, **kwargs):
    torch.manual_seed(0)
    logger = RecordingLogger()
    make_trainer(steps, callbacks, logger, **kwargs).fit(module, loader)
    return logger


@pytest.mark.parametrize("accumulate", [1, 2])
def test_values_equal_dense_hessians_at_w_t(accumulate):
    keep, cb = KeepCopies(), NormCurvatureCallback(every_n_steps=1)
    loader = classification_loader(n=48, batch_size=8)
    log = fit(TinyClassifier(norm="batch"), loader, [keep, cb], accumulate_grad_batches=accumulate)
    # Lightning scales each micro-batch's loss by 1/k; the step's loss is their sum, one block each
    sums: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    scale = 1.0 / accumulate
    for step, net, (x, target) in keep.copies:
        for layer in ("1", "4"):
            for key, value in dense_forms(net, layer, x, target, F.cross_entropy).items():
                sums[step][layer][key] += value * (scale**3 if key.startswith(("quad", "norm")) else scale**2)
    assert sorted(log.values("normcurv/net.1/quad_in")) == [0, 1, 2]
    for step, layers in sums.items():
        for layer, ref in layers.items():
            key = f"normcurv/net.{layer}"
            for stat in ("quad_in", "quad_out", "quad_chain", "norm_term"):
                assert log.values(f"{key}/{stat}")[step] == pytest.approx(ref[stat], rel=2e-3), (step, layer, stat)
            curv_in, curv_out = ref["quad_in"] / ref["in_sq"], ref["quad_out"] / ref["out_sq"]
            assert log.values(f"{key}/curv_in")[step] == pytest.approx(curv_in, rel=2e-3)
            assert log.values(f"{key}/curv_out")[step] == pytest.approx(curv_out, rel=2e-3)
            assert log.values(f"{key}/curv_ratio")[step] == pytest.approx(curv_in / curv_out, rel=4e-3)
            paper = log.values(f"{key}/norm_term_paper")[step]
            assert paper == pytest.approx(ref["norm_term"], rel=1e-2, abs=1e-3 * abs(ref["quad_in"]))


def test_standard_network_placeholder_sees_its_own_curvature():
    from lightning_bn import VGG

    cb = NormCurvatureCallback(every_n_steps=1)
    log = fit(VGG(norm="none", width=1 / 16, num_classes=10), image_loader(n=16, size=32, num_classes=10), [cb], 2)
    ratios = {k: v for _, m in log.records for k, v in m.items() if k.endswith("/curv_ratio")}
    assert len(ratios) == 8 and all(v == pytest.approx(1.0, rel=1e-5) for v in ratios.values())
    terms = [v for _, m in log.records for k, v in m.items() if k.endswith("/norm_term")]
    assert terms and all(v == 0 for v in terms)


def test_no_observer_effect(tmp_path):
    make_model, loader = MODELS["vgg-bn"]
    ref = _fit_with(make_model, loader, [], tmp_path, max_steps=3)
    cb = NormCurvatureCallback(every_n_steps=1)
    run = _fit_with(make_model, loader, [cb], tmp_path, max_steps=3)
    assert cb.last_measured_step == 2 and any(k.endswith("/curv_in") for k in cb.last_values)
    _assert_same_end_state(run, ref, prefixes=("normcurv/",))


def test_no_observer_effect_with_noise_dropout_and_accumulation(tmp_path):
    make_model, loader = MODELS["mlp-replaynoise-dropout"]
    kwargs = {"max_steps": 3, "accumulate_grad_batches": 2}
    ref = _fit_with(make_model, loader, [], tmp_path, **kwargs)
    run = _fit_with(make_model, loader, [NormCurvatureCallback(every_n_steps=1)], tmp_path, **kwargs)
    _assert_same_end_state(run, ref, prefixes=("normcurv/",))


class SyncBNModule(TinyClassifier):
    def __init__(self) -> None:
        super().__init__(norm="batch")
        self.net[1] = nn.SyncBatchNorm(8)


def test_sync_batch_norm_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"NormCurvatureCallback: layers \['net.1'\] are SyncBatchNorm"):
        fit(SyncBNModule(), classification_loader(), [NormCurvatureCallback(every_n_steps=1, layers=["net.1"])])


class SharedNorm(TinyClassifier):
    """One BatchNorm module used at two places of the forward."""

    def forward(self, x):
        h = torch.relu(self.net[1](self.net[0](x)))
        return self.net[6](torch.relu(self.net[1](self.net[3](h))))


def test_a_layer_called_twice_per_forward_is_refused_with_one_warning():
    cb = NormCurvatureCallback(every_n_steps=1, layers=["net.1"])
    with pytest.warns(MeasurementWarning, match="'net.1' is called 2 times per step's loss") as caught:
        log = fit(SharedNorm(), classification_loader(), [cb], steps=2)
    assert len([w for w in caught if issubclass(w.category, MeasurementWarning)]) == 1
    assert not log.values("normcurv/net.1/curv_in")


def test_bad_arguments_fail_in_one_line():
    with pytest.raises(ValueError, match="NormCurvatureCallback: every_n_steps"):
        NormCurvatureCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="NormCurvatureCallback: layers"):
        NormCurvatureCallback(layers="net.1")
    with pytest.raises(ValueError, match="NormCurvatureCallback layers \\['nope'\\] are not modules"):
        fit(TinyClassifier(), classification_loader(), [NormCurvatureCallback(layers=["nope"])])


class KeepBuffers(pl.Callback):
    """The module's buffers at every batch end: the running statistics the step's forward updated."""

    def __init__(self) -> None:
        self.buffers = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.buffers.append({n: b.clone() for n, b in pl_module.net.named_buffers()})


def test_eval_mode_uses_running_statistics_where_the_layer_is_affine():
    keep, buffers = KeepCopies(), KeepBuffers()
    cb = NormCurvatureCallback(every_n_steps=1, bn_mode="eval")
    log = fit(TinyClassifier(norm="batch"), classification_loader(n=32, batch_size=8), [keep, cb, buffers], steps=2)
    for (step, net, (x, target)), after in zip(keep.copies, buffers.buffers):
        net.load_state_dict(after, strict=False)  # W_t with the running statistics of measurement time
        ref = dense_forms(net.eval(), "1", x, target, F.cross_entropy)
        assert log.values("normcurv/net.1/quad_in")[step] == pytest.approx(ref["quad_in"], rel=2e-3)
        assert log.values("normcurv/net.1/quad_out")[step] == pytest.approx(ref["quad_out"], rel=2e-3)
        assert log.values("normcurv/net.1/norm_term")[step] == 0  # an affine map has no curvature of its own
        assert ref["norm_term"] == pytest.approx(0, abs=1e-12)
    assert not any(k.endswith("norm_term_paper") for _, m in log.records for k in m)
