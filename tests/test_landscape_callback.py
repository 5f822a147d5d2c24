"""LandscapeCallback in real fits: every logged value against brute force on copied models."""

from __future__ import annotations

import contextlib
import copy
import csv
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from callbacks import LandscapeCallback, MeasurementWarning, StepContext
from callbacks.guards import measuring
from callbacks.landscape_math import SUMMARY_KEYS
from callbacks.rng import RNGState
from tests._tiny_modules import RecordingLogger, TinyClassifier, classification_loader, make_trainer

pytestmark = pytest.mark.filterwarnings("error::callbacks.MeasurementWarning")
KEYS = {f"landscape/{k}" for k in SUMMARY_KEYS}


class Recorder(pl.Callback):
    """Records what a brute-force reference needs at every step: the batch, the RNG at batch
    start, W_t and g_t (before the optimizer step), and a copy of the network at batch end
    (its buffers and noise realization are those the measurement sees)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps[trainer.global_step] = {"batch": batch, "rng": torch.get_rng_state()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        rec = self.steps[trainer.global_step]
        rec["params"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        rec["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        rec["lr"] = optimizer.param_groups[0]["lr"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step - 1]["net"] = copy.deepcopy(pl_module.net)


def brute_force(rec: dict[str, Any], etas: list[float], bn_mode: str) -> tuple[list[float], list[float]]:
    """L(W_t - eta g_t) and ||grad L(W_t - eta g_t) - g_t|| with one deep copy per eta."""
    x, y = rec["batch"]
    losses, diffs = [], []
    for eta in etas:
        net = copy.deepcopy(rec["net"]).train(bn_mode == "train")
        for m in net.modules():
            if hasattr(m, "replay_noise"):
                m.replay_noise = True
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(rec["params"]["net." + n] - eta * rec["grads"]["net." + n])
        torch.set_rng_state(rec["rng"])
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        diff = torch.cat([(p.grad - rec["grads"]["net." + n]).flatten() for n, p in net.named_parameters()])
        losses.append(loss.item())
        diffs.append(diff.norm().item())
    return losses, diffs


CASES = [
    # norm, dropout, bn_mode, method
    ("batch", 0.3, "train", "loop"),
    ("batch", 0.3, "train", "batched"),
    ("noisy", 0.0, "train", "loop"),
    ("batch", 0.0, "eval", "batched"),
]


@pytest.mark.parametrize(("norm", "dropout", "bn_mode", "method"), CASES)
def test_every_logged_value_matches_brute_force_on_copies(norm, dropout, bn_mode, method):
    torch.manual_seed(0)
    model = TinyClassifier(norm=norm, dropout=dropout, lr=0.2)
    recorder, logger = Recorder(), RecordingLogger()
    cb = LandscapeCallback(
        every_n_steps=2,
        bn_mode=bn_mode,
        method=method,
        chunk_size=3,
        figure_every_n_steps=None,
        log_each_step_size=True,
    )
    make_trainer(5, [recorder, cb], logger).fit(model, classification_loader())
    measured = sorted(logger.values("landscape/loss_min"))
    assert measured == [0, 2, 4]
    multipliers = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    for step in measured:
        rec = recorder.steps[step]
        etas = [m * rec["lr"] for m in multipliers]
        losses, diffs = brute_force(rec, etas, bn_mode)
        g_norm = torch.cat([g.flatten() for g in rec["grads"].values()]).norm().item()
        expected = {
            "loss_min": min(losses),
            "loss_max": max(losses),
            "grad_diff_min": min(diffs),
            "grad_diff_max": max(diffs),
            "beta_smoothness": max(d / (eta * g_norm) for d, eta in zip(diffs, etas)),
            "grad_norm": g_norm,
        }
        for m, loss, diff in zip(multipliers, losses, diffs):
            expected[f"loss/lr_x{m:g}"] = loss
            expected[f"grad_diff/lr_x{m:g}"] = diff
        logged = {k: v for s, metrics in logger.records if s == step for k, v in metrics.items()}
        assert set(logged) >= {f"landscape/{k}" for k in expected}
        for key, value in expected.items():
            assert logged[f"landscape/{key}"] == pytest.approx(value, rel=2e-5, abs=1e-6), (step, key)


class Quadratic(pl.LightningModule):
    """L(x) = 0.5 x^T H x (the batch is ignored): grad L(x - eta g) - g = -eta H g."""

    def __init__(self, h: torch.Tensor, x0: torch.Tensor, lr: float) -> None:
        super().__init__()
        self.register_buffer("h", h)
        self.x = nn.Parameter(x0.clone())
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return 0.5 * self.x @ self.h @ self.x

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_quadratic_closed_form_through_the_trainer(method):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    h = (a + a.T) / 2 + 2 * torch.eye(5, dtype=torch.float64)  # symmetric, known
    x = torch.randn(5, generator=gen, dtype=torch.float64)
    lr, steps = 0.05, 4
    logger = RecordingLogger()
    cb = LandscapeCallback(every_n_steps=1, step_sizes=[0.01, 0.1, 0.3], method=method, figure_every_n_steps=None)
    data = DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)
    make_trainer(steps, [cb], logger).fit(Quadratic(h, x, lr), data)
    etas = torch.tensor([0.01, 0.1, 0.3], dtype=torch.float64)
    for t in range(steps):
        g = h @ x
        hg = torch.linalg.vector_norm(h @ g)
        losses = 0.5 * x @ h @ x - etas * (g @ g) + 0.5 * etas**2 * (g @ h @ g)
        expected = {
            "beta_smoothness": hg / torch.linalg.vector_norm(g),
            "grad_norm": torch.linalg.vector_norm(g),
            "grad_diff_min": etas[0] * hg,
            "grad_diff_max": etas[-1] * hg,
            "loss_min": losses.min(),
            "loss_max": losses.max(),
        }
        for key, value in expected.items():
            assert logger.values(f"landscape/{key}")[t] == pytest.approx(float(value), rel=1e-10), (t, key)
        x = x - lr * g  # plain SGD


def test_batched_falls_back_to_loop_once_with_the_same_values():
    class ItemInLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.last = loss.item()  # vmap cannot trace .item()
            return loss

    values = {}
    for method in ("loop", "batched"):
        torch.manual_seed(0)
        logger = RecordingLogger()
        cb = LandscapeCallback(every_n_steps=1, method=method, figure_every_n_steps=None)
        if method == "batched":
            with pytest.warns(MeasurementWarning, match="method='loop'") as record:
                make_trainer(3, [cb], logger).fit(ItemInLoss(), classification_loader())
            assert sum("method='loop'" in str(w.message) for w in record) == 1
        else:
            make_trainer(3, [cb], logger).fit(ItemInLoss(), classification_loader())
        values[method] = logger.values("landscape/beta_smoothness")
    assert values["batched"].keys() == {0, 1, 2}
    assert values["batched"] == pytest.approx(values["loop"], rel=1e-6)


def test_figure_goes_to_tensorboard_and_keys_are_documented(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    logger = pl.loggers.TensorBoardLogger(tmp_path, name="run", version=0)
    cb = LandscapeCallback(every_n_steps=2, figure_every_n_steps=4)
    make_trainer(7, [cb], logger).fit(TinyClassifier(), classification_loader())
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Images("landscape/figure")] == [0, 4, 6]  # every >= 4 steps, and at the end
    logged = {t for t in events.Tags()["scalars"] if t.startswith("landscape/")}
    assert logged == KEYS
    assert [e.step for e in events.Scalars("landscape/beta_smoothness")] == [0, 2, 4, 6]
    assert cb.history["beta_smoothness"][0] == [0, 2, 4, 6]


def test_history_survives_a_checkpoint():
    cb = LandscapeCallback(every_n_steps=1, figure_every_n_steps=None)
    make_trainer(3, [cb], RecordingLogger()).fit(TinyClassifier(), classification_loader())
    state = cb.state_dict()
    resumed = LandscapeCallback(every_n_steps=1, figure_every_n_steps=None)
    resumed.load_state_dict(state)
    assert resumed.history == cb.history and len(cb.history["loss_max"][1]) == 3
    other = LandscapeCallback(every_n_steps=1, step_sizes=[0.1])
    assert other.state_key != cb.state_key  # two grids in one trainer keep separate states


def test_param_groups_with_different_lrs_need_step_sizes():
    class TwoGroups(TinyClassifier):
        def configure_optimizers(self):
            first, *rest = list(self.parameters())
            return torch.optim.SGD([{"params": [first], "lr": 0.1}, {"params": rest, "lr": 0.01}])

    with pytest.raises(ValueError, match="step_sizes"):
        make_trainer(2, [LandscapeCallback(every_n_steps=1, figure_every_n_steps=None)], RecordingLogger()).fit(
            TwoGroups(), classification_loader()
        )
    logger = RecordingLogger()
    cb = LandscapeCallback(every_n_steps=1, step_sizes=[0.05, 0.1], figure_every_n_steps=None)
    make_trainer(2, [cb], logger).fit(TwoGroups(), classification_loader())
    assert sorted(logger.values("landscape/loss_max")) == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"step_sizes": []}, "step_sizes"),
        ({"step_sizes": [0.1, 0.0]}, "step_sizes"),
        ({"lr_multipliers": [-1.0]}, "lr_multipliers"),
        ({"bn_mode": "frozen"}, "bn_mode"),
        ({"method": "vmap"}, "method"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"figure_every_n_steps": 0}, "figure_every_n_steps"),
    ],
)
def test_arguments_are_checked_at_once(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LandscapeCallback(**kwargs)


@pytest.mark.parametrize("norm", ["batch", "noisy"])  # noisy: ReplayNoise calls int(tensor), vmap fails mid-loss
def test_batched_path_has_no_observer_effect(norm):
    """vmap with per-eta buffer copies (and a vmap that fails halfway and falls back to the loop)
    leaves the fit bit-identical: parameters, buffers, optimizer state, RNG, the module's logging."""

    def fit(callbacks):
        pl.seed_everything(0)
        model, logger = TinyClassifier(norm=norm, dropout=0.3, optimizer="adam"), RecordingLogger()
        trainer = make_trainer(3, callbacks, logger)
        trainer.fit(model, classification_loader(shuffle=True))
        return model, trainer.optimizers[0].state_dict()["state"], logger, torch.get_rng_state()

    cb = LandscapeCallback(every_n_steps=1, method="batched", chunk_size=4, figure_every_n_steps=None)
    ref, ref_opt, ref_log, ref_rng = fit([])
    if norm == "noisy":
        with pytest.warns(MeasurementWarning, match="using method='loop'"):
            model, opt, log, rng = fit([cb])
    else:
        model, opt, log, rng = fit([cb])
    assert sorted(log.values("landscape/loss_max")) == [0, 1, 2]
    assert cb._method_in_use == ("batched" if norm == "batch" else "loop")
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    for key, fields in ref_opt.items():
        for field, value in fields.items():
            assert torch.equal(torch.as_tensor(opt[key][field]), torch.as_tensor(value)), (key, field)
    assert torch.equal(rng, ref_rng)
    own = [(s, {k: v for k, v in m.items() if not k.startswith("landscape/")}) for s, m in log.records]
    assert [r for r in own if r[1]] == ref_log.records
    noise = [(m.draws, m.replay_noise) for m in model.modules() if hasattr(m, "replay_noise")]
    assert noise == [(m.draws, False) for m in ref.modules() if hasattr(m, "replay_noise")]


class TiedNet(pl.LightningModule):
    """Two layers sharing one weight, a frozen layer and dropout: W(eta) must reach both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.frozen = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.c.weight = self.b.weight
        self.frozen.requires_grad_(False)
        self.drop = nn.Dropout(0.3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.frozen(self.c(self.drop(torch.tanh(self.b(self.a(x)))))), y)


def test_tied_parameters_move_together_and_come_back():
    torch.manual_seed(0)
    net, batch = TiedNet().train(), (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    rng = RNGState.capture().torch_only()
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(net.training_step(batch, 0), list(trainable.values()))
    ctx = StepContext(None, net, 0, batch, 0, rng=rng)
    ctx.params_t = {n: p.detach().clone() for n, p in net.named_parameters()}
    ctx.grads_t, ctx.lrs_t = dict(zip(trainable, grads)), [0.1]
    originals = dict(net.named_parameters())
    with measuring():
        values = LandscapeCallback(every_n_steps=1, step_sizes=[0.2], figure_every_n_steps=None).measure(None, net, ctx)
    assert dict(net.named_parameters()) == originals and net.c.weight is net.b.weight
    reference = copy.deepcopy(net)  # brute force: move the copy's (shared) weight, same dropout mask
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if n in ctx.grads_t:
                p.sub_(0.2 * ctx.grads_t[n])
    torch.set_rng_state(rng.torch_cpu)
    loss = reference.training_step(batch, 0)
    moved = [p for n, p in reference.named_parameters() if n in ctx.grads_t]
    diff = torch.cat([(a - ctx.grads_t[n]).flatten() for a, n in zip(torch.autograd.grad(loss, moved), ctx.grads_t)])
    assert float(values["landscape/loss_min"]) == pytest.approx(loss.item(), rel=1e-6)
    assert float(values["landscape/grad_diff_min"]) == pytest.approx(diff.norm().item(), rel=1e-5)


class ShardedNet(pl.LightningModule):
    """No batch statistics (GroupNorm): the mean of per-rank losses is the global-batch loss.

    A global batch of 16 samples per step, split over the ranks without shuffling, so one
    process and two ranks see the same samples at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        data, ranks = classification_loader(n=48).dataset, self.trainer.world_size
        sampler = DistributedSampler(data, shuffle=False) if ranks > 1 else None
        return DataLoader(data, batch_size=16 // ranks, sampler=sampler)


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_logs_the_global_batch_values(tmp_path):
    steps = 3
    torch.manual_seed(0)
    single = RecordingLogger()
    make_trainer(steps, [LandscapeCallback(every_n_steps=1, figure_every_n_steps=None)], single).fit(ShardedNet())
    torch.manual_seed(0)
    trainer = make_trainer(
        steps,
        [LandscapeCallback(every_n_steps=1, figure_every_n_steps=None)],
        pl.loggers.CSVLogger(tmp_path, name="ddp", version=0),
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    trainer.fit(ShardedNet())
    with open(tmp_path / "ddp" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in sorted(KEYS):
        ddp = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
        assert sorted(ddp) == list(range(steps)), key
        for step, value in ddp.items():
            assert value == pytest.approx(single.values(key)[step], rel=1e-5, abs=1e-7), (key, step)


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_unit_direction_moves_fixed_distances_and_matches_brute_force(method):
    """direction='unit': W(d) = W_t - d g_t / ||g_t||; per distance, loss and gradient
    difference against copies moved by eta = d / ||g_t||; beta = max diff / d."""
    torch.manual_seed(0)
    model = TinyClassifier(norm="batch", dropout=0.3, lr=0.2)
    recorder, logger = Recorder(), RecordingLogger()
    distances = [0.05, 0.1, 0.4]
    cb = LandscapeCallback(
        every_n_steps=2, step_sizes=distances, direction="unit", method=method,
        figure_every_n_steps=None, log_each_step_size=True,
    )  # fmt: skip
    make_trainer(3, [recorder, cb], logger).fit(model, classification_loader())
    for step in (0, 2):
        rec = recorder.steps[step]
        g_norm = torch.cat([g.flatten() for g in rec["grads"].values()]).norm().item()
        losses, diffs = brute_force(rec, [d / g_norm for d in distances], "train")
        logged = {k: v for s, metrics in logger.records if s == step for k, v in metrics.items()}
        for d, loss, diff in zip(distances, losses, diffs):
            assert logged[f"landscape/loss/dist_{d:g}"] == pytest.approx(loss, rel=2e-5, abs=1e-6)
            assert logged[f"landscape/grad_diff/dist_{d:g}"] == pytest.approx(diff, rel=2e-5, abs=1e-6)
        beta = max(diff / d for d, diff in zip(distances, diffs))
        assert logged["landscape/beta_smoothness"] == pytest.approx(beta, rel=2e-5)
        assert logged["landscape/grad_norm"] == pytest.approx(g_norm, rel=1e-6)


def test_unit_direction_needs_distances():
    with pytest.raises(ValueError, match=r"^LandscapeCallback: step_sizes is required with direction='unit'"):
        LandscapeCallback(direction="unit")
    with pytest.raises(ValueError, match=r"^LandscapeCallback: direction must be one of"):
        LandscapeCallback(direction="random")


def test_both_directions_in_one_run_with_a_key_suffix():
    """A gradient and a unit-direction callback side by side (``key_suffix="_unit"``): every key
    of the second ends in the suffix, the values are those of brute force for each direction,
    and the two measurements do not disturb each other or training."""
    torch.manual_seed(0)
    model = TinyClassifier(norm="batch", dropout=0.3, lr=0.2)
    recorder, logger = Recorder(), RecordingLogger()
    distances = [0.05, 0.4]
    gradient = LandscapeCallback(every_n_steps=2, step_sizes=[0.1, 0.3], figure_every_n_steps=None)
    unit = LandscapeCallback(
        every_n_steps=2, step_sizes=distances, direction="unit", key_suffix="_unit",
        figure_every_n_steps=None, log_each_step_size=True,
    )  # fmt: skip
    assert set(unit.expected_keys(model)) == {f"landscape/{k}_unit" for k in SUMMARY_KEYS} | {
        f"landscape/{kind}/dist_{d:g}_unit" for d in distances for kind in ("loss", "grad_diff")
    }
    make_trainer(3, [recorder, gradient, unit], logger).fit(model, classification_loader())
    for step in (0, 2):
        rec = recorder.steps[step]
        logged = {k: v for s, metrics in logger.records if s == step for k, v in metrics.items()}
        losses, diffs = brute_force(rec, [0.1, 0.3], "train")
        assert logged["landscape/loss_max"] == pytest.approx(max(losses), rel=2e-5, abs=1e-6)
        assert logged["landscape/grad_diff_max"] == pytest.approx(max(diffs), rel=2e-5, abs=1e-6)
        g_norm = torch.cat([g.flatten() for g in rec["grads"].values()]).norm().item()
        losses, diffs = brute_force(rec, [d / g_norm for d in distances], "train")
        for d, loss, diff in zip(distances, losses, diffs):
            assert logged[f"landscape/loss/dist_{d:g}_unit"] == pytest.approx(loss, rel=2e-5, abs=1e-6)
            assert logged[f"landscape/grad_diff/dist_{d:g}_unit"] == pytest.approx(diff, rel=2e-5, abs=1e-6)
        beta = max(diff / d for d, diff in zip(distances, diffs))
        assert logged["landscape/beta_smoothness_unit"] == pytest.approx(beta, rel=2e-5)
        assert logged["landscape/grad_norm_unit"] == pytest.approx(logged["landscape/grad_norm"], rel=1e-7)
    # training itself is that of a run without the measurements
    torch.manual_seed(0)
    plain = TinyClassifier(norm="batch", dropout=0.3, lr=0.2)
    make_trainer(3, [], RecordingLogger()).fit(plain, classification_loader())
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_two_instances_without_distinct_suffixes_are_refused():
    first = LandscapeCallback(every_n_steps=2, figure_every_n_steps=None)
    second = LandscapeCallback(every_n_steps=2, step_sizes=[0.1], direction="unit", figure_every_n_steps=None)
    with pytest.raises(ValueError, match=r"would log landscape/.*give one a distinct key_suffix"):
        make_trainer(1, [first, second], RecordingLogger()).fit(TinyClassifier(), classification_loader())


@pytest.mark.parametrize("suffix", ["unit", "_", "_a/b", "_x_at_bound", 3])
def test_key_suffix_is_checked_at_once(suffix):
    with pytest.raises(ValueError, match=r"^LandscapeCallback: key_suffix must be '' or _-separated words"):
        LandscapeCallback(key_suffix=suffix)


class _ReadsRunningMean(nn.BatchNorm1d):
    """A BatchNorm whose own forward reads its running mean in train mode."""

    def forward(self, x):
        return super().forward(x) + self.running_mean


def test_sequential_calls_see_the_original_state_and_restore_it_also_on_errors():
    """The per-measurement guards of the loop: every call sees the buffers and metric states of
    the start (BN in train mode updates its running statistics, the metric is updated, a buffer
    replaced), the originals are back between calls (but those of a torch BatchNorm in train
    mode, which its forward never reads), and on exit, also after a call that raised or gave nan."""
    import torchmetrics

    from callbacks.guards import SequentialCalls

    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), _ReadsRunningMean(4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    net.train()
    net[4].eval()  # reads its running statistics
    net[3].register_forward_hook(lambda mod, inp, out: out + mod.running_var)  # a hook that reads them
    net.register_buffer("counter", torch.zeros(()))
    net.register_buffer("strided", torch.randn(4, 6)[:, ::2])  # not contiguous: copied on its own
    for bn in net[1:]:
        bn.running_mean.normal_()
    metric = torchmetrics.MeanMetric()  # not in net: nn.Sequential would run it as a layer
    metric.update(torch.tensor(2.0))
    originals = {n: b for n, b in net.named_buffers()}
    bits = {n: b.clone() for n, b in originals.items()}
    kept = {n for n in originals if n.startswith("1.")}  # the plain BatchNorm in train mode only
    metric_before = (metric.mean_value.clone(), metric.weight.clone(), metric._update_count)
    x = torch.randn(8, 3)
    with SequentialCalls(list(net.modules()), [metric]) as calls:
        for i, how in enumerate(["ok", "raise", "nan", "ok"]):
            with torch.enable_grad(), pytest.raises(RuntimeError) if how == "raise" else contextlib.nullcontext():
                with calls.call():
                    for n, b in net.named_buffers():
                        assert b is not originals[n], n
                        assert n in kept or torch.equal(b, bits[n]), (i, n)
                    assert net.counter == bits["counter"] and metric._update_count == metric_before[2]
                    net.strided.mul_(3)  # written in place
                    assert torch.equal(metric.mean_value, metric_before[0])
                    out = net(x if how != "nan" else x * float("nan")).sum()
                    net.counter = net.counter + 1  # replaced, not written in place
                    torch.autograd.grad(out, list(net.parameters()))
                    metric.update(out.detach())
                    if how == "raise":
                        raise RuntimeError("a step size failed")
            for n, b in net.named_buffers():
                assert (b is not originals[n]) if n in kept else (b is originals[n]), (i, n)
                assert torch.equal(originals[n], bits[n]), (i, n)
            assert torch.equal(metric.mean_value, metric_before[0]) and torch.equal(metric.weight, metric_before[1])
            assert metric._update_count == metric_before[2]
    for n, b in net.named_buffers():
        assert b is originals[n] and torch.equal(b, bits[n]), n


def test_buffers_a_batch_norm_never_reads_give_the_per_call_losses():
    """Not resetting a train-mode BatchNorm's running statistics between calls changes no loss
    and no gradient, bit for bit, also with momentum=None (num_batches_tracked sets the factor)."""
    from callbacks.guards import SequentialCalls, buffers_isolated

    torch.manual_seed(0)
    layers = [nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2), nn.BatchNorm1d(2, momentum=None)]
    net = nn.Sequential(*layers)
    net.train()
    x, params = torch.randn(16, 3), list(net.parameters())
    scales = [0.5, 1.0, 2.0, 4.0]

    def loss_at(scale):
        with torch.no_grad():
            for p in params:
                p.mul_(scale)
        try:
            loss = net(x).square().mean()
            return loss.detach(), torch.autograd.grad(loss, params)
        finally:
            with torch.no_grad():
                for p in params:
                    p.div_(scale)

    fresh = []
    for scale in scales:
        with buffers_isolated(net):
            fresh.append(loss_at(scale))
    # what may read the buffers keeps them reset per call: a forward of the instance, a global hook
    net[1].forward = lambda x: nn.BatchNorm1d.forward(net[1], x) + net[1].running_mean
    assert len(SequentialCalls(list(net.modules()), [])._kept) == 3
    del net[1].forward
    handle = nn.modules.module.register_module_forward_hook(lambda mod, inp, out: out)
    try:
        assert not SequentialCalls(list(net.modules()), [])._kept
    finally:
        handle.remove()
    with SequentialCalls(list(net.modules()), []) as calls:
        assert len(calls._kept) == 6 and not calls._slots
        for scale, (loss, grads) in zip(scales, fresh):
            with calls.call():
                got_loss, got_grads = loss_at(scale)
            assert torch.equal(got_loss, loss) and all(map(torch.equal, got_grads, grads))


def test_metric_state_copies_are_kept_while_the_state_is_unchanged():
    import torchmetrics

    from callbacks.guards import _MetricStates

    train, val = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()
    train.update(torch.tensor(1.0))
    val.update(torch.tensor(5.0))
    kept: dict = {}
    first = _MetricStates([train, val], kept)
    train.update(torch.tensor(3.0))  # training moves on: a state written in place
    second = _MetricStates([train, val], kept)
    copies = {(id(e[0]), e[1]): e[2] for e in first._tensors}
    for mod, attr, saved, _, _ in second._tensors:
        assert (saved is copies[(id(mod), attr)]) == (mod is val), attr  # reused only for the unchanged metric
    val.update(torch.tensor(7.0))  # a call updates both
    train.update(torch.tensor(9.0))
    second.restore()
    assert float(train.compute()) == 2.0 and float(val.compute()) == 5.0


def test_fused_finiteness_check_agrees_with_the_per_tensor_check():
    from callbacks.finite import all_finite, non_finite_names

    big = torch.full((4,), 3e38)  # finite, but its 1-norm overflows: the exact check decides
    cases = [
        ({"a": torch.randn(3), "b": torch.randn(2, 2)}, []),
        ({"a": torch.randn(3), "b": torch.tensor([1.0, float("nan")])}, ["b"]),
        ({"a": torch.tensor([float("-inf")]), "b": big}, ["a"]),
        ({"a": big, "b": big.clone()}, []),  # one group whose sum overflows: finite all the same
        ({"a": big, "h": torch.ones(2, dtype=torch.float16)}, []),
        ({"h": torch.tensor([float("inf")], dtype=torch.float16), "i": torch.ones(2, dtype=torch.int64)}, ["h"]),
        ({"p": nn.Parameter(torch.randn(2))}, []),
    ]
    for tensors, bad in cases:
        assert non_finite_names(tensors) == bad
    # the cheap test: True only when every element is finite; False also for an overflowing sum
    assert all_finite([]) and all_finite([torch.randn(3), torch.tensor(2.0)])
    assert not all_finite([torch.randn(3), torch.tensor([float("nan")])]) and not all_finite([big, big])


def test_the_tensorboard_figure_legend_names_the_run():
    from types import SimpleNamespace

    from callbacks.landscape import run_label

    def trainer(version):
        logger = None if version is False else SimpleNamespace(version=version)
        return SimpleNamespace(lightning_module=TinyClassifier(), logger=logger)

    assert run_label(trainer("norm=batch_norm,seed=0")) == "norm=batch_norm,seed=0"
    assert run_label(trainer(3)) == "TinyClassifier version_3"
    assert run_label(trainer(False)) == "TinyClassifier"
