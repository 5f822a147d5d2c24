"""Compiled CPU kernels for the lp and noisy_batch norms, built once at first use.

Why: on small activations (an MLP's 128 x 32, a DLN's 1000 x 32) BatchNorm is two fused C++
kernels, while the same layer written in PyTorch ops pays a few microseconds of Python
dispatch per op; the lp and noisy norms need 10-20 of them and end up 2-2.5x slower than
BatchNorm. The C++ sources in ``csrc/`` do each training forward and backward in one call
and one autograd node written in C++ (``benchmarks/norm_speed.py`` prints the ratios):

* ``torch.ops.lightning_bn.lp_norm``: lp with p = 1 or inf on ``(N, C, ...)`` inputs, equal to
  the Python path up to float rounding (sums in another order); the layer calls it for ``(N, C)``
  activations and for p = 1 on feature maps of 8x8 and more, where it is not the slower path;
* ``torch.ops.lightning_bn.noisy_batch_norm``: noisy BatchNorm on any ``(N, C, ...)`` input,
  bit-identical to the Python path (same ATen calls, same random numbers).

Both differentiate twice (Hessian-vector products) through the layer's plain definition. The
layers call them for CPU float32/float64 tensors; CUDA, other dtypes, ``torch.compile`` tracing
and ``torch.func`` transforms take the Python path (tests/test_kernels.py checks both).

Building: ``torch.utils.cpp_extension.load`` compiles the sources with the machine's C++
compiler and ninja into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``; see :func:`build_directory`) the first time a norm needs them,
about 30 s once per machine, torch version and source change (Lightning's log says so while it
builds); processes that start together (DDP ranks, parallel sweep runs) wait for one build.
When that fails (no C++20 compiler, no ninja), a warning says why once and the Python path is
used: slower, same results.

``LIGHTNING_BN_KERNELS`` (environment variable): ``auto`` (default) as above, ``off`` never
build (Python path only), ``require`` raise instead of falling back (for CI, to be sure the
compiled path is the one tested).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_bn.errors import ConfigError

ENV = "LIGHTNING_BN_KERNELS"
NAME = "lightning_bn_kernels"
MODES = ("auto", "off", "require")
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("lp_flat_kernels.cpp", "lp_maps_kernels.cpp", "lp_op.cpp", "noisy_batch_norm.cpp")]
HEADERS = [CSRC / name for name in ("lp_kernels.h", "double_backward.h")]
_DTYPES = (torch.float32, torch.float64)
LP_MAPS_MIN_SPATIAL = 64  # lp_norm on feature maps (p = 1): not slower than the Python path from 8x8 up
LP_FLAT_MAX_ROWS = 1 << 24  # lp_norm on (N, C) keeps row indices in the input's float type: exact to 2^24

# None: not tried yet; True: torch.ops.lightning_bn holds the ops; False: Python path only.
_loaded: bool | None = None


def mode() -> str:
    """The ``LIGHTNING_BN_KERNELS`` setting, checked: one of :data:`MODES`."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"{ENV}={value!r} is not allowed; choose one of: {', '.join(MODES)}")
    return value


def available() -> bool:
    """Whether the compiled ops are loaded, building them on the first call (see module doc)."""
    global _loaded
    if _loaded is None:
        _loaded = _load(mode())
    return _loaded


def usable(x: torch.Tensor) -> bool:
    """Whether a norm's training step on ``x`` may call the compiled ops: a CPU float32/float64
    tensor outside ``torch.compile`` tracing, and the ops built. Cheap after the first call."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or torch.compiler.is_compiling():
        return False
    return _loaded if _loaded is not None else available()


def _load(setting: str) -> bool:
    if setting == "off":
        return False
    try:
        _build()
    except Exception as error:  # compiler, ninja or headers missing, or a build error
        if setting == "require":
            raise RuntimeError(f"lightning_bn: building the CPU kernels failed ({ENV}=require): {error}") from error
        reason = _first_error_line(str(error)) or type(error).__name__
        warnings.warn(
            f"lightning_bn: could not build the CPU kernels for the lp/noisy_batch norms ({reason}); "
            f"using the Python path (same results, up to ~2x slower on small activations). "
            f"Set {ENV}=off to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _first_error_line(message: str) -> str:
    """The compiler's first ``error:`` line of a failed build, else the message's first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line), lines[0] if lines else "")


def _build() -> None:
    # cpp_extension warns at import that CUDA_HOME exists without a CUDA runtime: irrelevant
    # here (a CPU-only build), and confusing in a training log.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:  # the `ninja` wheel (a dependency) puts its binary beside the venv's
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
        except ImportError:
            pass
    directory = build_directory(cpp_extension.get_default_build_root())
    # torch renames the library (NAME_v1.so, ...) when the sources or flags change
    built = [library.stat().st_mtime for library in directory.glob(f"{NAME}*.so")]
    newest_source = max(source.stat().st_mtime for source in [*SOURCES, *HEADERS])
    if not built or max(built) < newest_source:
        # Lightning's logger prints INFO by default (on rank 0 only): the pause is explained.
        rank_zero_info("lightning_bn: building the CPU kernels of the lp/noisy_batch norms (once per machine, ~30 s)")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=NAME,
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3"],
            build_directory=str(directory),
            with_cuda=False,
            is_python_module=False,
            verbose=False,
        )
    finally:
        os.environ["PATH"] = path


def build_directory(default_root: str) -> Path:
    """Where the kernels are built: ``$TORCH_EXTENSIONS_DIR`` (else torch's default root), then a
    folder per torch and Python version, so an upgraded torch never loads a library built against
    another one's ABI (torch's own folder names only the Python and CUDA versions)."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or default_root)
    return root / f"{NAME}-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
