"""The states of NumPy's and Python's global generators read from their memory, in 1-2 µs.

``np.random.get_state()`` takes 50-90 µs and ``random.getstate()`` 15-30 µs (they build arrays
and tuples of 624 numbers); a measured step captures both at its start and compares them at its
end. Read raw, the same states cost a memory copy:

- NumPy's legacy global ``RandomState``: its MT19937 bit generator's ``mt19937_state``
  (``uint32 key[624]; int pos``) and the ``RandomState``'s cached gaussian (``int has_gauss;
  double gauss``): together exactly what ``get_state()`` returns besides the name.
- Python's ``random``: the C ``Random`` object's ``int index; uint32_t state[624]`` and the
  ``gauss_next`` attribute: exactly what ``random.getstate()`` returns besides the version.

The C layouts are not a public API, so nothing is assumed: the offsets are found once per
process on private probe instances of the same types, by setting two known states through the
public ``set_state``/``setstate`` and locating their bytes, and :func:`numpy_raw` and
:func:`python_raw` return None (callers then use ``get_state()``) wherever a probe does not
match, the global generator is of another type or NumPy's global bit generator is not MT19937.
Equal raw states are equal states; :func:`numpy_state` and :func:`python_state` turn a raw state
into the tuple ``set_state``/``setstate`` take, equal to what ``get_state``/``getstate`` return.
"""

from __future__ import annotations

import ctypes
import functools
import random
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

_N = 624
_MT_BYTES = _N * 4 + 4  # numpy's mt19937_state: uint32 key[624], int pos
_PY_BYTES = 4 + _N * 4  # CPython's RandomObject: int index, uint32_t state[624]


def _int_offset(
    probe: object, setter: Callable[[Any], Any], states: list[tuple[Any, bytes, int]], before: int
) -> int | None:
    """Where an int sits in ``probe``'s memory, ``before`` bytes ahead of a known pattern: for
    each (state, pattern, int) the probe is set through its public ``setter``, the pattern must
    occur once in its memory and the int right where expected; the offset is the int's, and
    the same for every state (None if anything does not match)."""
    offsets = set()
    for state, pattern, expected in states:
        setter(state)
        raw = ctypes.string_at(id(probe), type(probe).__basicsize__)
        at = raw.find(pattern)
        if at < before or raw.find(pattern, at + 1) >= 0:
            return None
        if struct.unpack_from("<i", raw, at - before)[0] != expected:
            return None
        offsets.add(at - before)
    return offsets.pop() if len(offsets) == 1 else None


@functools.cache
def _numpy_gauss_offset() -> int | None:
    """Offset of ``has_gauss`` (an int, ``gauss`` a double 8 bytes after it) in a ``RandomState``."""
    probe = np.random.RandomState(0)
    name, key, pos = probe.get_state()[:3]
    states = [
        ((name, key, pos, has, value), struct.pack("<d", value), has)
        for has, value in ((1, 0.8414709848078965), (0, -1.2599210498948732))
    ]
    return _int_offset(probe, probe.set_state, states, before=8)


@functools.cache
def _python_offset() -> int | None:
    """Offset of ``index`` (an int, the 624 state words right after it) in a ``random.Random``."""
    probe = random.Random(0)
    version, internal, _ = probe.getstate()
    marks = (((0xDEADBEEF, 0x01234567, 0x89ABCDEF), 17), ((0x0BADF00D, 0x76543210, 0xFEDCBA98), 601))
    states = [
        ((version, words + internal[3:_N] + (index,), None), struct.pack("<3I", *words), index)
        for words, index in marks
    ]
    return _int_offset(probe, probe.setstate, states, before=4)


def numpy_raw() -> bytes | None:
    """NumPy's global legacy state as bytes (key, pos, has_gauss, padding, gauss), or None."""
    rand = getattr(np.random.mtrand, "_rand", None)
    bit_generator = getattr(rand, "_bit_generator", None)
    if type(rand) is not np.random.RandomState or type(bit_generator) is not np.random.MT19937:
        return None
    offset = _numpy_gauss_offset()
    if offset is None:
        return None
    return ctypes.string_at(bit_generator.ctypes.state_address, _MT_BYTES) + ctypes.string_at(id(rand) + offset, 16)


def numpy_state(raw: bytes) -> tuple[str, np.ndarray, int, int, float]:
    """The ``np.random.get_state()`` tuple of a :func:`numpy_raw` state."""
    key = np.frombuffer(raw, dtype="<u4", count=_N).astype(np.uint32)  # a copy, native order
    pos, has_gauss = struct.unpack_from("<ii", raw, _N * 4)
    (gauss,) = struct.unpack_from("<d", raw, _MT_BYTES + 8)
    return "MT19937", key, pos, has_gauss, gauss


def python_raw() -> tuple[bytes, Any] | None:
    """Python's global ``random`` state as (index and state words, ``gauss_next``), or None."""
    inst = getattr(random, "_inst", None)
    if type(inst) is not random.Random or getattr(random.getstate, "__self__", None) is not inst:
        return None
    offset = _python_offset()
    if offset is None:
        return None
    return ctypes.string_at(id(inst) + offset, _PY_BYTES), inst.gauss_next


def python_state(raw: tuple[bytes, Any]) -> tuple[int, tuple[int, ...], Any]:
    """The ``random.getstate()`` tuple of a :func:`python_raw` state."""
    words, gauss_next = raw
    index, *state = struct.unpack(f"<i{_N}I", words)
    return random.Random.VERSION, (*state, index), gauss_next
