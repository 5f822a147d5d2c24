"""ModuleIndex: the module tree's lists are reused from step to step only while the tree is unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from callbacks.context import StepContext
from callbacks.module_index import ModuleIndex
from callbacks.rng import RNGState


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _fresh(module: nn.Module) -> tuple[dict, dict]:
    every = list(module.modules())
    return dict(module.named_parameters()), {
        "all": every,
        "buffers": [m for m in every if m._buffers],
        "noise": [m for m in every if isinstance(getattr(m, "replay_noise", None), bool)],
    }


def _same(index: ModuleIndex, module: nn.Module) -> None:
    named, lists = index.lists(module)
    want_named, want_lists = _fresh(module)
    assert list(named) == list(want_named) and all(named[n] is want_named[n] for n in named)
    for kind, want in want_lists.items():
        assert len(lists[kind]) == len(want) and all(a is b for a, b in zip(lists[kind], want)), kind


def test_unchanged_tree_reuses_the_lists():
    net, index = _net(), ModuleIndex()
    first = index.lists(net)
    assert index.lists(net)[1] is first[1] and index.lists(net)[0] is first[0]
    _same(index, net)


def test_every_change_of_the_tree_lists_it_again():
    net, index = _net(), ModuleIndex()
    index.lists(net)

    def changes(module: nn.Module) -> Iterator[Callable[[], None]]:
        yield lambda: setattr(module, "3", nn.Linear(4, 2))  # a submodule replaced
        yield lambda: setattr(module[0], "weight", nn.Parameter(torch.zeros(4, 3)))  # a parameter replaced
        yield lambda: module[0].register_parameter("extra", nn.Parameter(torch.zeros(1)))  # one added
        yield lambda: module[2].register_buffer("counter", torch.zeros(()))  # a first buffer
        yield lambda: setattr(module[2], "replay_noise", False)  # a new noise source
        yield lambda: module.append(nn.Linear(2, 2))  # a submodule added
        yield lambda: delattr(module[0], "extra")  # a parameter removed

    for change in changes(net):
        before = index.lists(net)
        change()
        after = index.lists(net)
        assert after[1] is not before[1]
        _same(index, net)
    other = _net()  # another module with the same structure
    assert index.lists(other)[0]["0.weight"] is other[0].weight


def test_step_contexts_sharing_an_index_see_the_live_tree():
    net, index = _net(), ModuleIndex()
    rng = RNGState.capture(host=False)
    first = StepContext(None, net, 0, None, 0, rng=rng, index=index)
    assert first._named()["3.weight"] is net[3].weight
    net[3] = nn.Linear(4, 2)
    second = StepContext(None, net, 1, None, 0, rng=rng, index=index)
    assert second._named()["3.weight"] is net[3].weight and second._modules()[-1] is net[3]
    second._named().pop("3.weight")  # a step's dict is its own
    assert "3.weight" in StepContext(None, net, 2, None, 0, rng=rng, index=index)._named()
