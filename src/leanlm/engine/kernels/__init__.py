"""leanlm's own CPU kernels, compiled on first use with the machine's C++ compiler.

``linear_small_m.cpp``: weight-streaming linear layers for decode (1-16 input rows) over bf16
weights. The library registers the torch ops ``leanlm::linear_bf16(x, weight, bias)`` (and the others below)
in C++ (cheap dispatch from eager code); ``linear_avx512.cpp``: its path with bf16 pair dot products on CPUs
with AVX512-BF16, chosen at run time; ``linear_int8.cpp``: ``leanlm::linear_int8(x, codes, row_scale, bias)``
over int8 codes, with the input rows rounded to int8 per block of 32 and integer dot products (AVX512-VNNI
where the CPU has it, else AVX2); ``use_avx512(False)`` takes the AVX2 paths of both; ``linear_int4.cpp``:
``leanlm::linear_int4(x, codes, scales, zeros, group_size, bias)`` over group-wise 4-bit codes, the same way
(AVX2 ``maddubs``; an AVX512-VNNI variant measured no faster);
``decode_attention.cpp``: ``leanlm::decode_attention(q, keys, values, length, keep, scale)``, one
query per sequence and head against a cache's first ``length`` slots (a chain of queries of one
sequence, for speculative verification: one shared cache, one length per row; grouped K/V heads, bf16 or
float32 cache, float32 softmax); ``quantized_attention.cpp``:
``leanlm::quantized_decode_attention``, the same over a KIVI cache's packed codes plus its
full-precision residual (kvcache/quantized.py), for 2- and 4-bit codes by integer dot products
(``int8_dots.h``; ``use_int8_attention(False)`` or ``LEANLM_INT8_ATTENTION=0``: float32 FMAs).
Fake kernels registered here let a ``torch.compile``d decode step call them as opaque kernels.

Where they cannot be built (no compiler, no AVX2/FMA, another architecture) ``available()`` is
False, one warning says why, and callers use ``torch.nn.functional.linear``. ``LEANLM_KERNELS=0``
turns them off (the benchmarks' A/B switch is ``use_kernels(False)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import torch

from leanlm.switch import Switch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name)
           for name in ("linear_small_m.cpp", "linear_avx512.cpp", "linear_int8.cpp", "linear_int4.cpp",
                        "decode_attention.cpp", "quantized_attention.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("attention_blocks.h", "int8_dots.h", "linear_io.h")]
MAX_ROWS = 16  # above this many input rows (prefill) ATen's GEMM is the better kernel
_state: dict = {"module": None, "tried": False}
_enabled = Switch(os.environ.get("LEANLM_KERNELS", "1") != "0")
# integer dot products in the quantized-cache attention (int8_dots.h); LEANLM_INT8_ATTENTION=0 keeps float32
int8_attention = Switch(os.environ.get("LEANLM_INT8_ATTENTION", "1") != "0")


def _cpu_supports_avx2() -> bool:
    capability = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else ""
    return capability.upper().startswith(("AVX2", "AVX512"))


def _build():
    if not _cpu_supports_avx2():
        raise RuntimeError("this CPU has no AVX2/FMA")
    from torch.utils.cpp_extension import load  # lazy: imports setuptools and checks the compiler

    # torch's JIT build hashes the sources only: the headers' hash goes in as a define so that editing them rebuilds
    headers = hashlib.sha1(b"".join(path.read_bytes() for path in HEADERS)).hexdigest()[:12]
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", f"-DLEANLM_HEADERS_{headers}"]
    load("leanlm_kernels", sources=[str(path) for path in SOURCES], extra_cflags=flags, extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)  # loading the library registers torch.ops.leanlm.*
    _register_fakes()
    return torch.ops.leanlm


def kernels():
    """``torch.ops.leanlm`` once the library is loaded, or None (built once per process; a failure is logged once)."""
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = _build()
        except Exception as error:  # noqa: BLE001 - no compiler, unsupported CPU: fall back to ATen
            log.warning("leanlm's CPU kernels are unavailable (%s: %s); linear layers use ATen",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    return _state["module"]


def available() -> bool:
    return bool(_enabled) and kernels() is not None


def use_kernels(enabled: bool):
    """Turn leanlm's kernels on or off inside the block (A/B timing against ATen)."""
    return _enabled.set(enabled)


@contextlib.contextmanager
def use_avx512(enabled: bool):
    """The AVX-512 paths of ``leanlm::linear_bf16`` / ``linear_int8`` (on CPUs that have them) on or off inside
    the block; off, bf16 weights are widened to float32 and multiplied with AVX2 FMAs, int8 codes with AVX2's
    integer multiply-adds (the same sums, in another order)."""
    ops = kernels()
    before = ops.set_avx512(enabled) if ops is not None else None
    try:
        yield
    finally:
        if ops is not None:
            ops.set_avx512(before)


def has_avx512(bf16: bool = False, vnni: bool = False) -> bool:
    """Whether this CPU has the AVX-512 the kernels use (F, BW, VL; with ``bf16``, also AVX512-BF16; with
    ``vnni``, also AVX512-VNNI)."""
    ops = kernels()
    if ops is None:
        return False
    return bool(ops.has_avx512()) and (not bf16 or bool(ops.has_avx512_bf16())) and (not vnni or bool(ops.has_avx512_vnni()))


def use_int8_attention(enabled: bool):
    """Integer (int8 x code) dot products in ``leanlm::quantized_decode_attention`` on or off inside the block."""
    return int8_attention.set(enabled)


def _register_fakes() -> None:
    """Shapes for ``torch.compile`` (the ops themselves are defined and implemented in C++)."""

    @torch.library.register_fake("leanlm::linear_bf16")
    def _(x, weight, bias=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("leanlm::linear_int8")
    def _(x, codes, row_scale, bias=None):
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    @torch.library.register_fake("leanlm::linear_int4")
    def _(x, codes, scales, zeros, group_size, bias=None):
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    @torch.library.register_fake("leanlm::decode_attention")
    def _(q, keys, values, length, keep, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("leanlm::quantized_decode_attention")
    def _(q, key_codes, key_scale, key_low, value_codes, value_scale, value_low, rotation, res_keys, res_values,
          key_bits, value_bits, scale, int8=True):
        return q.new_empty(q.shape)
