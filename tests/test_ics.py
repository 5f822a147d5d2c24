"""ICSCallback (Santurkar Def. 2.1) against a brute-force reference built from deep copies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from callbacks import ICSCallback
from callbacks.ics import ics_metrics, weight_layers
from tests._tiny_modules import (
    RecordingLogger,
    TinyClassifier,
    TinyDLN,
    classification_loader,
    make_trainer,
    one_thread,  # noqa: F401  (fixture)
    regression_loader,
)

pytestmark = [pytest.mark.filterwarnings("error::callbacks.MeasurementWarning"), pytest.mark.usefixtures("one_thread")]


class BruteForceICS(ICSCallback):
    """Computes the reference next to the callback, at the same step.

    At ``on_before_optimizer_step`` (W_t, g_t live) it deep-copies the module and the
    optimizer and steps the copy to get W_{t+1} independently. Then, for the i-th
    Linear of a Sequential ``layers``, G' is the gradient of a fresh copy at W_t whose
    modules before the layer hold the copied optimizer's W_{t+1}; G is the copy's grad at W_t.
    """

    def __init__(self, seq_attr: str, loss_fn, **kwargs) -> None:
        super().__init__(every_n_steps=1, **kwargs)
        self.seq_attr, self.loss_fn = seq_attr, loss_fn
        self.reference: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self._pending is None:
            return
        x, y = self._pending.batch
        at_t = copy.deepcopy(pl_module)
        stepped = copy.deepcopy(pl_module)
        opt = type(optimizer)(stepped.parameters(), **optimizer.defaults)
        opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        for p_live, p in zip(pl_module.parameters(), stepped.parameters()):
            p.grad = p_live.grad.clone()
        opt.step()
        seq_t, seq_next = getattr(at_t, self.seq_attr), getattr(stepped, self.seq_attr)
        for m in at_t.modules():  # the training step's noise, not a new draw
            if hasattr(m, "replay_noise"):
                m.replay_noise = True
        out = {}
        for i, layer in enumerate(seq_t):
            if not isinstance(layer, nn.Linear):
                continue
            fresh = copy.deepcopy(at_t)
            g = torch.autograd.grad(self.loss_fn(fresh(x), y), list(getattr(fresh, self.seq_attr)[i].parameters()))
            probe = copy.deepcopy(at_t)
            seq = getattr(probe, self.seq_attr)
            with torch.no_grad():
                for j in range(i):
                    for p, q in zip(seq[j].parameters(), seq_next[j].parameters()):
                        p.copy_(q)
            g_prime = torch.autograd.grad(self.loss_fn(probe(x), y), list(seq[i].parameters()))
            l2, cos = ics_metrics(g, g_prime)
            name = f"{self.seq_attr}.{i}"
            out[f"ics/{name}/l2_diff"], out[f"ics/{name}/cosine"] = float(l2), float(cos)
        self.reference[self._pending.step] = out
        self.w_next = [p.detach().clone() for p in stepped.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._pending is not None:  # the copied optimizer wrote what the real one wrote
            for p, q in zip(pl_module.parameters(), self.w_next):
                torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def _run(model, loader, callback, steps=3):
    logger = RecordingLogger()
    make_trainer(max_steps=steps, callbacks=[callback], logger=logger).fit(model, loader)
    return logger


@pytest.mark.parametrize("share_forward", [True, False])
@pytest.mark.parametrize(
    ("norm", "optimizer"), [("batch", "adam"), ("noisy", "sgd"), ("none", "sgd")], ids=["bn-adam", "noisy-sgd", "none"]
)
def test_ics_matches_brute_force_on_tiny_mlp(norm, optimizer, share_forward):
    torch.manual_seed(0)
    model = TinyClassifier(norm=norm, optimizer=optimizer, lr=0.05)
    cb = BruteForceICS("net", F.cross_entropy, share_forward=share_forward)
    logger = _run(model, classification_loader(), cb)
    assert sorted(cb.reference) == [0, 1, 2]
    for step, ref in cb.reference.items():
        for key, value in ref.items():
            assert logger.values(key)[step] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    first = "ics/net.0/l2_diff"  # nothing runs before the first layer: G' = G
    assert all(v == 0.0 for v in logger.values(first).values())
    assert any(logger.values("ics/net.6/l2_diff")[s] > 1e-4 for s in range(3))


def test_ics_matches_brute_force_on_deep_linear_net():
    torch.manual_seed(0)
    model = TinyDLN(width=5, depth=4, lr=0.05)
    cb = BruteForceICS("layers", F.mse_loss)
    logger = _run(model, regression_loader(), cb)
    for step, ref in cb.reference.items():
        for key, value in ref.items():
            assert logger.values(key)[step] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    assert set(cb.last_values) == {f"ics/layers.{i}/{k}" for i in range(4) for k in ("l2_diff", "cosine")}


def test_shared_forward_skips_the_prefix(monkeypatch):
    """With share_forward the Linear forwards before layer i are replayed, not recomputed:
    1 recording forward (3 linears) + suffixes 3 + 2 + 1, instead of 3 + 3 * 3."""
    calls = {"n": 0}
    original = nn.Linear.forward

    def counting(self, x):
        calls["n"] += 1
        return original(self, x)

    counts = {}
    for share in (True, False):
        torch.manual_seed(0)
        model = TinyClassifier(norm="batch")
        cb = ICSCallback(every_n_steps=1, share_forward=share)
        monkeypatch.setattr(nn.Linear, "forward", counting)
        calls["n"] = 0
        _run(model, classification_loader(), cb, steps=1)
        monkeypatch.setattr(nn.Linear, "forward", original)
        counts[share] = calls["n"] - 3  # minus the training forward
    assert counts == {True: 3 + 6, False: 3 + 9}


def test_layers_argument_and_forward_order():
    torch.manual_seed(0)
    model = TinyClassifier(norm="batch")
    assert weight_layers(model) == ["net.0", "net.3", "net.6"]
    cb = ICSCallback(every_n_steps=2, layers=["net.3", "net.1"])  # a norm module is a valid "layer" too
    logger = _run(model, classification_loader(), cb, steps=3)
    assert sorted(logger.values("ics/net.3/cosine")) == [0, 2]
    assert set(cb.last_values) == {"ics/net.1/l2_diff", "ics/net.1/cosine", "ics/net.3/l2_diff", "ics/net.3/cosine"}


def test_eval_bn_mode_recomputes_g_in_eval_mode():
    """In eval mode nothing before the first layer changes, so its G' equals the eval-mode G."""
    torch.manual_seed(0)
    cb = ICSCallback(every_n_steps=1, bn_mode="eval")
    logger = _run(TinyClassifier(norm="batch"), classification_loader(), cb, steps=2)
    assert all(v == 0.0 for v in logger.values("ics/net.0/l2_diff").values())
    assert all(v > 0 for v in logger.values("ics/net.6/l2_diff").values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": []}, "layers"),
        ({"layers": "net.0"}, "layers"),
        ({"share_forward": 1}, "share_forward"),
        ({"bn_mode": "batch"}, "bn_mode"),
        ({"every_n_steps": 0}, "every_n_steps"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ICSCallback(**{"every_n_steps": 1, **kwargs})


def test_unknown_layer_fails_at_setup():
    trainer = make_trainer(callbacks=[ICSCallback(every_n_steps=1, layers=["net.99"])], logger=RecordingLogger())
    with pytest.raises(ValueError, match="net.99"):
        trainer.fit(TinyClassifier(), classification_loader())
