"""Decode-time linear layers that stream their weights once per step (``engine/kernels``).

``enable_streaming_linears(model)`` turns every plain bf16 ``nn.Linear`` on the CPU into a
``StreamingLinear``: the same module (parameters, state-dict keys, hooks, tied weights untouched),
whose forward calls leanlm's kernel when a step has at most 16 rows (decode) and nothing needs a
gradient, and ``F.linear`` otherwise (training, other devices and dtypes). PyTorch's own bf16 matmul
on CPUs without native bf16 arithmetic (``mkldnn_bf16_supported`` False: AVX2 machines) reads weights
at a fraction of the memory bandwidth and slows down ~linearly with the rows of a batch; the kernel
keeps a batch-1 step near the weight stream and a batch-8 step close to a batch-1 step.

Prefill-sized calls (more than 16 rows, no gradient) on such CPUs are *widened*: input and weight
go to float32, float32 GEMM, result rounded back to bf16 once. On this project's AVX2 machine that
is ~6x faster than ATen's bf16 GEMM at 128 rows (a (128, 576) x (576, 1536) product: 1.8 ms against
12.0 ms; a 128-token SmolLM2 prefill: ~0.3 s against 1.5 s), which is the server's time to first
token and the stall a prefill chunk puts on running sequences. The widened copy of a weight lives
for one call only (no float32 copy of the model is kept). ``disable_streaming_linears`` undoes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.engine import kernels

_native_bf16: dict = {}


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


class StreamingLinear(nn.Linear):
    """An ``nn.Linear`` whose decode-sized calls run ``leanlm::linear_bf16`` and whose prefill-sized
    calls run in float32 where the CPU has no bf16 arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if self._use_kernel(x, rows):
            return torch.ops.leanlm.linear_bf16(x, self.weight, self.bias)
        if self._widen(x, rows):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def _widen(self, x: torch.Tensor, rows: int) -> bool:
        return (rows > kernels.MAX_ROWS and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.bfloat16
                and not (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad))
                and not native_bf16_matmul())

    def _use_kernel(self, x: torch.Tensor, rows: int) -> bool:
        weight = self.weight
        return (rows <= kernels.MAX_ROWS and x.device.type == "cpu" and weight.dtype == torch.bfloat16
                and weight.is_contiguous() and x.shape[-1] % 8 == 0
                and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
                and kernels.available())


def enable_streaming_linears(model: nn.Module) -> int:
    """Swap plain bf16 CPU ``nn.Linear`` modules to ``StreamingLinear`` in place; returns how many
    are streaming now (0 where the kernels cannot be built: nothing changes then)."""
    if not kernels.available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu":
            module.__class__ = StreamingLinear
        count += type(module) is StreamingLinear
    return count


def disable_streaming_linears(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is StreamingLinear:
            module.__class__ = nn.Linear
