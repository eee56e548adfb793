"""Decode-time linear layers that stream their weights once per step (``engine/kernels``).

``enable_streaming_linears(model)`` turns every plain bf16 ``nn.Linear`` on the CPU into a
``StreamingLinear``: the same module (parameters, state-dict keys, hooks, tied weights untouched),
whose forward calls leanlm's kernel when a step has at most 16 rows (decode) and nothing needs a
gradient, and ``WideLinear``'s forward otherwise (prefill, training, other devices and dtypes). PyTorch's own bf16 matmul
on CPUs without native bf16 arithmetic (``mkldnn_bf16_supported`` False: AVX2 machines) reads weights
at a fraction of the memory bandwidth and slows down ~linearly with the rows of a batch; the kernel
keeps a batch-1 step near the weight stream and a batch-8 step close to a batch-1 step.

Prefill-sized calls (more than 16 rows) on such CPUs are *widened* (``models.widen.WideLinear``):
input and weight go to float32, float32 GEMM, result rounded back to bf16 once. On this project's AVX2
machine that is ~6x faster than ATen's bf16 GEMM (a 128-token SmolLM2 prefill: ~0.3 s against 1.5 s),
which is the server's time to first token and the stall a prefill chunk puts on running sequences.
``disable_streaming_linears`` undoes it.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlm.engine import kernels
from leanlm.models.widen import WideLinear, native_bf16_matmul, rows_of  # noqa: F401 (native_bf16_matmul re-exported)


class StreamingLinear(WideLinear):
    """An ``nn.Linear`` whose decode-sized calls run ``leanlm::linear_bf16`` and whose prefill-sized
    calls run in float32 where the CPU has no bf16 arithmetic (``WideLinear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x, rows_of(x)):
            return torch.ops.leanlm.linear_bf16(x, self.weight, self.bias)
        return super().forward(x)

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
        if type(module) in (nn.Linear, WideLinear) and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu":
            module.__class__ = StreamingLinear
        count += type(module) is StreamingLinear
    return count


def disable_streaming_linears(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is StreamingLinear:
            module.__class__ = nn.Linear
