"""bf16 linear layers whose many-row products run in float32 on CPUs without bf16 arithmetic.

On CPUs where oneDNN has no bf16 GEMM (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` False: AVX2
machines such as this project's), ATen's bf16 GEMM converts inside its inner loops and runs ~6x slower
than a float32 GEMM of the same shape (a (128, 576) x (576, 1536) product: 12.0 ms against 1.8 ms).
A bf16 model's evaluation, head scoring and distillation are nothing but such products. ``WideLinear``
runs a call with more than ``MIN_ROWS`` rows in float32 instead: input and weight widened for that one
call, float32 GEMM, the result rounded back to bf16 once — the same bf16 model (ATen's bf16 GEMM also
accumulates in float32 and rounds once), computed faster. Autograd goes through the casts, so training
widens too (the float32 copies then live until the backward pass). Small calls (decode) stay in bf16.

``widened_linears(*models)`` applies it for the duration of a block and restores the modules after;
on CPUs with native bf16, on GPUs and for float32 models it changes nothing. It swaps the modules'
class, so: a deepcopy or ``torch.save`` of a model inside the block keeps ``WideLinear`` modules (they
load and behave as ``nn.Linear`` elsewhere), two threads sharing one model share the swap, and a
module whose forward accelerate has hooked keeps ``nn.Linear``'s forward. Under CPU autocast the GEMM
is left to autocast (it would cast the widened inputs back to bf16).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.switch import Switch

MIN_ROWS = 16  # at most this many rows (a decode step) stay in bf16: widening them would only add the copy
# (equal to engine.kernels.MAX_ROWS, the largest call the decode kernel takes: a test holds them together)
_native_bf16: dict = {}
_switch = Switch(True)


def native_bf16_matmul() -> bool:
    """Whether oneDNN has a bf16 GEMM for this CPU (its own check: AVX512 cores and up); where it has
    not (AVX2), ATen's bf16 GEMM converts in its inner loops and float32 is the faster way for many rows."""
    if "cpu" not in _native_bf16:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            _native_bf16["cpu"] = bool(check()) if check is not None else True
        except RuntimeError:  # an op that is not there in this build: assume native, change nothing
            _native_bf16["cpu"] = True
    return _native_bf16["cpu"]


def use_widening(enabled: bool):
    """Switch widening off (or on) for a block: the A/B of ``benchmarks/widen_speed.py``."""
    return _switch.set(enabled)


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


class WideLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, state-dict keys and hooks) whose bf16 CPU calls with more than
    ``MIN_ROWS`` rows run in float32 where the CPU has no bf16 GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._widen(x, rows_of(x)):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def _widen(self, x: torch.Tensor, rows: int) -> bool:
        return (rows > MIN_ROWS and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.bfloat16
                and bool(_switch) and not native_bf16_matmul() and not torch.is_autocast_enabled("cpu"))


def widens(module: nn.Module) -> bool:
    """Whether ``widened_linears`` would turn this module into a ``WideLinear``."""
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and weight is not None and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu" and bool(_switch) and not native_bf16_matmul())


@contextmanager
def widened_linears(*models: nn.Module | None) -> Iterator[int]:
    """Within the block, the plain bf16 CPU ``nn.Linear`` modules of ``models`` are ``WideLinear``
    (yields how many); afterwards they are plain ``nn.Linear`` again. ``None`` entries are skipped."""
    swapped = [m for model in models if model is not None for m in model.modules() if widens(m)]
    for module in swapped:
        module.__class__ = WideLinear
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            if type(module) is WideLinear:
                module.__class__ = nn.Linear
