"""Capture and restore every random number stream a training step may draw from.

Torch (CPU and every initialized CUDA device), NumPy's global generator and Python's
``random``. A measurement replays the state captured when the batch started (so dropout
draws the masks the training step drew) and puts the live state back afterwards (so the
training run downstream draws exactly what it would have drawn without the measurement).
"""

from __future__ import annotations

import ctypes
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class RNGState:
    """The state of every stream; ``numpy``/``python`` None means "leave that stream alone".

    ``numpy_bytes``: the raw MT19937 state (key and position) of NumPy's global generator,
    read in 0.5 µs where ``np.random.get_state()`` takes 50 µs; it tells cheaply and exactly
    whether NumPy's stream is still at ``numpy`` (:meth:`numpy_unchanged`)."""

    torch_cpu: torch.Tensor
    torch_cuda: tuple[torch.Tensor, ...] | None
    numpy: Any
    python: Any
    numpy_bytes: bytes | None = None

    @classmethod
    def capture(cls, host: bool = True) -> RNGState:
        """The current state; ``host=False`` skips NumPy and Python (torch streams only)."""
        cuda = None
        if torch.cuda.is_initialized():  # cheap; is_available() would probe the driver every call
            cuda = tuple(torch.cuda.get_rng_state_all())
        if not host:
            return cls(torch.get_rng_state(), cuda, None, None)
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate(), _mt19937_bytes())

    def with_live_torch(self) -> RNGState:
        """The live torch streams with this state's NumPy and Python parts (for a caller that
        has checked that those are still live: :meth:`host_unchanged`)."""
        live = RNGState.capture(host=False)
        return RNGState(live.torch_cpu, live.torch_cuda, self.numpy, self.python, self.numpy_bytes)

    def numpy_unchanged(self) -> bool:
        """Whether NumPy's global stream is exactly at ``numpy`` now, decided from the raw MT19937
        bytes; False when that cannot be decided so (then compare full states). The bytes miss
        only the cached gaussian (``has_gauss``, ``gauss``), and a state without one cannot gain
        one without advancing the generator (NumPy's legacy gaussian draws a pair and caches
        one; only ``np.random.set_state`` could set it alone), so the answer is exact when the
        captured state holds no cached gaussian."""
        if self.numpy is None or self.numpy_bytes is None or self.numpy[3] != 0:
            return False
        return _mt19937_bytes() == self.numpy_bytes

    def host_unchanged(self) -> bool:
        """Whether NumPy's and Python's streams are both still at this state (cheap; False also
        when it cannot be decided cheaply)."""
        return self.numpy_unchanged() and random.getstate() == self.python

    def same_as(self, other: RNGState) -> bool:
        """Whether no stream moved between ``other`` and ``self``."""
        return (
            torch.equal(self.torch_cpu, other.torch_cpu)
            and (self.torch_cuda is None) == (other.torch_cuda is None)
            and (self.torch_cuda is None or all(map(torch.equal, self.torch_cuda, other.torch_cuda)))
            and self.host_same_as(other)
        )

    def host_same_as(self, other: RNGState) -> bool:
        """Whether NumPy's and Python's streams are the same in both (or captured in neither)."""
        if self.numpy is None or other.numpy is None:
            return self.numpy is None and other.numpy is None
        return (
            self.numpy[2:] == other.numpy[2:]
            and bool((self.numpy[1] == other.numpy[1]).all())
            and self.python == other.python
        )

    def torch_only(self) -> RNGState:
        """This state without NumPy and Python (capturing/restoring those costs ~0.1 ms each)."""
        return RNGState(self.torch_cpu, self.torch_cuda, None, None)

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(list(self.torch_cuda))
        if self.numpy is not None and not self.numpy_unchanged():  # set_state alone is 60 µs
            np.random.set_state(self.numpy)
        if self.python is not None:
            random.setstate(self.python)


_MT_STATE_BYTES = 624 * 4 + 4  # numpy's mt19937_state: uint32 key[624], int pos


def _mt19937_bytes() -> bytes | None:
    """The raw state of NumPy's global MT19937 (None if the global generator is another one)."""
    bit_generator = getattr(getattr(np.random.mtrand, "_rand", None), "_bit_generator", None)
    if type(bit_generator) is not np.random.MT19937:
        return None
    return ctypes.string_at(bit_generator.ctypes.state_address, _MT_STATE_BYTES)


@contextmanager
def preserved_rng(host: bool = True) -> Iterator[None]:
    """Whatever runs inside (measurement code included), the live RNG state is unchanged after
    (``host=False``: the torch streams only)."""
    live = RNGState.capture(host=host)
    try:
        yield
    finally:
        live.restore()


@contextmanager
def replayed_rng(state: RNGState) -> Iterator[None]:
    """Run with the RNG streams set to ``state``; put the live streams back afterwards.
    Streams that ``state`` leaves alone (None) are neither replayed nor captured."""
    live = RNGState.capture(host=state.numpy is not None)
    try:
        state.restore()
        yield
    finally:
        live.restore()
