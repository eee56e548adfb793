"""int8 weights, symmetric, one scale per output channel: ``w ~= q * scale`` with q in [-127, 127].

The matmul reads the int8 codes: half the bytes of bf16 read per step. Decode-sized calls (<= 16 rows,
in_features a multiple of 32) use leanlm's ``linear_int8`` (engine/kernels/linear_int8.cpp: the input rows rounded to int8 per block of
32, integer dot products, as llama.cpp's Q8_0), others ATen's ``_weight_int8pack_mm(x, q, scale)`` (float
inputs). The group size does not apply (one scale per row), so any ``group_size`` is accepted and
recorded as 0.
"""

from __future__ import annotations

import torch

from leanlm.engine import kernels
from leanlm.transforms.quantize.base import INPUT_BLOCK, QuantizedLinear, kernel_for_every_call, register, round_up_scale


@register
class Int8Linear(QuantizedLinear):
    scheme = "int8"
    bits = 8

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = qweight.shape
        super().__init__(in_features, out_features, 0, bias)
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scales", scales)  # (out,) in the original weight's dtype

    @classmethod
    def check(cls, in_features: int, out_features: int, group_size: int) -> str | None:
        return None

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> "Int8Linear":
        w = weight.detach().float()  # (out, in)
        scale = round_up_scale(w.abs().amax(dim=1).clamp_min(1e-8) / 127, weight.dtype)  # (out,)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # (out, in)
        return cls(q.contiguous(), scale, bias)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], group_size: int) -> "Int8Linear":
        return cls(state["qweight"], state["scales"], state.get("bias"))

    def portable_state(self) -> dict[str, torch.Tensor]:
        state = {"qweight": self.qweight, "scales": self.scales}
        return state | ({"bias": self.bias} if self.bias is not None else {})

    def scale_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        w = self.qweight[rows].float() * self.scales[rows, None].float()  # (T, in)
        return w.to(self.scales.dtype)

    def step_sizes(self) -> torch.Tensor:
        return self.scales.float()[:, None].expand(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        # codes <= 127 are exact in any float dtype, so one rounding of the product, as in dequantize_rows
        return self.qweight.to(self.scales.dtype).mul_(self.scales[:, None])  # (out, in)

    def _rounds_inputs(self, x2d: torch.Tensor) -> bool:
        """Whether this call runs leanlm's kernel: decode-sized (or every call, ``use_kernel_for_every_call``)."""
        decode_sized = x2d.shape[0] <= kernels.MAX_ROWS or bool(kernel_for_every_call)
        return x2d.device.type == "cpu" and decode_sized and self.in_features % INPUT_BLOCK == 0 and kernels.available()

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        if self._rounds_inputs(x2d):
            return torch.ops.leanlm.linear_int8(x2d, self.qweight, self.scales, None)  # decode: stream the codes
        return torch.ops.aten._weight_int8pack_mm(x2d, self.qweight, self.scales)  # (tokens, out)
