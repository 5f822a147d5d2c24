"""The raw reads of NumPy's and Python's generator states equal their public get_state()."""

from __future__ import annotations

import random

import numpy as np
import pytest

from callbacks import rng_raw
from callbacks.rng import RNGState


def _same_numpy(a, b) -> bool:
    return a[0] == b[0] and a[1].dtype == b[1].dtype and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def _draw(i: int) -> None:
    """A mix of draws that moves the streams in every way a step might (cached gaussians too)."""
    if i % 3 == 0:
        np.random.randn()
    if i % 5 == 0:
        np.random.rand(i)
    if i % 7 == 0:
        np.random.randint(0, 10, size=3)
    random.random()
    if i % 4 == 0:
        random.gauss(0, 1)


def test_raw_states_equal_get_state_after_every_kind_of_draw():
    np.random.seed(3)
    random.seed(4)
    for i in range(60):
        _draw(i)
        assert _same_numpy(rng_raw.numpy_state(rng_raw.numpy_raw()), np.random.get_state()), i
        assert rng_raw.python_state(rng_raw.python_raw()) == random.getstate(), i


def test_raw_states_equal_exactly_when_the_states_do():
    np.random.seed(0)
    random.seed(0)
    seen_np, seen_py = [], []
    for i in range(30):
        _draw(i)
        seen_np.append((rng_raw.numpy_raw(), np.random.get_state()))
        seen_py.append((rng_raw.python_raw(), random.getstate()))
    for raw_a, full_a in seen_np:
        for raw_b, full_b in seen_np:
            assert (raw_a == raw_b) == _same_numpy(full_a, full_b)
    for raw_a, full_a in seen_py:
        for raw_b, full_b in seen_py:
            assert (raw_a == raw_b) == (full_a == full_b)


def test_a_restored_state_reads_back_raw():
    np.random.seed(1)
    np.random.randn()  # a cached gaussian
    state = RNGState.capture()
    for i in range(10):
        _draw(i)
    state.restore()
    assert rng_raw.numpy_raw() == state.numpy_raw and rng_raw.python_raw() == state.python_raw


def test_another_global_generator_falls_back_to_get_state(monkeypatch):
    """Where the global generator is not the legacy MT19937 RandomState (or not random.Random),
    nothing is read raw: the public get_state() path keeps every check exact."""
    monkeypatch.setattr(np.random.mtrand, "_rand", np.random.RandomState(np.random.PCG64(0)))
    assert rng_raw.numpy_raw() is None
    state = RNGState.capture()
    assert state.numpy_raw is None and state.numpy is not None and not state.numpy_unchanged()


@pytest.mark.parametrize("which", ["numpy", "python"])
def test_a_probe_that_does_not_match_disables_the_raw_read(monkeypatch, which):
    """The layouts are found on probes; where none matches (another build), the reads decline."""
    if which == "numpy":
        monkeypatch.setattr(rng_raw, "_numpy_gauss_offset", lambda: None)
        assert rng_raw.numpy_raw() is None
    else:
        monkeypatch.setattr(rng_raw, "_python_offset", lambda: None)
        assert rng_raw.python_raw() is None
    state = RNGState.capture()
    random.random()
    np.random.rand()
    assert not state.host_unchanged()
    state.restore()
    assert state.host_same_as(RNGState.capture())
