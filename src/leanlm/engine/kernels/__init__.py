"""leanlm's own CPU kernels, compiled on first use with the machine's C++ compiler.

``linear_small_m.cpp``: weight-streaming linear layers for decode (1-16 input rows) over bf16
weights or int8 codes. They are registered as the torch ops ``leanlm::linear_bf16`` and
``leanlm::linear_int8`` so a ``torch.compile``d decode step calls them as opaque kernels.

Where they cannot be built (no compiler, no AVX2/FMA, another architecture) ``available()`` is
False, one warning says why, and callers use ``torch.nn.functional.linear``. ``LEANLM_KERNELS=0``
turns them off (the benchmarks' A/B switch is ``use_kernels(False)``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("linear_small_m.cpp")
MAX_ROWS = 16  # above this many input rows (prefill) ATen's GEMM is the better kernel
_state: dict = {"module": None, "tried": False, "enabled": os.environ.get("LEANLM_KERNELS", "1") != "0"}


def _cpu_supports_avx2() -> bool:
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    return capability.upper().startswith(("AVX2", "AVX512"))


def _build():
    if not _cpu_supports_avx2():
        raise RuntimeError("this CPU has no AVX2/FMA")
    from torch.utils.cpp_extension import load  # lazy: imports setuptools and checks the compiler

    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
    return load("leanlm_linear_small_m", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                verbose=False)


def kernels():
    """The compiled extension, or None (built once per process; a failure is logged once)."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = _build()
        except Exception as error:  # noqa: BLE001 - no compiler, unsupported CPU: fall back to ATen
            log.warning("leanlm's CPU kernels are unavailable (%s: %s); linear layers use ATen",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    return _state["module"]


def available() -> bool:
    return _state["enabled"] and kernels() is not None


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Turn leanlm's kernels on or off inside the block (A/B timing against ATen)."""
    before = _state["enabled"]
    _state["enabled"] = enabled
    try:
        yield
    finally:
        _state["enabled"] = before


@torch.library.custom_op("leanlm::linear_bf16", mutates_args=())
def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a contiguous bf16 (out, in) weight and at most 16 rows of x."""
    return kernels().linear_bf16(x, weight, bias)


@linear_bf16.register_fake
def _(x, weight, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("leanlm::linear_int8", mutates_args=())
def linear_int8(x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ codes.T) * row_scale + bias`` for contiguous int8 (out, in) codes and at most 16 rows of x."""
    return kernels().linear_int8(x, codes, row_scale, bias)


@linear_int8.register_fake
def _(x, codes, row_scale, bias=None):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
