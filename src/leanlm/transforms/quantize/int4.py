"""int4 weights, asymmetric, one (scale, zero) per group of ``group_size`` inputs of each output row.

``w ~= (q - 8) * scale + zero`` with q in [0, 15]. The codes are held as (out, in / 2) bytes, the even
column in the low nibble (the checkpoint layout too), scales and zeros as (out, in / group) in the
weight's dtype. On CPU, decode-sized calls run leanlm's ``linear_int4`` kernel (engine/kernels): the
input rows rounded to int8 per block of 32 and integer dot products over the codes, llama.cpp's Q4
approach, so its result is the dequantized weight times the rounded input (``input_steps`` gives the
rounding steps); where the kernels are unavailable or in_features is not a multiple of 64, and on other
devices, the weight is dequantized for the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from leanlm.engine import kernels
from leanlm.transforms.quantize.base import QuantizedLinear, register, round_up_scale

GROUP_SIZES = (32, 64, 128, 256)


@register
class Int4Linear(QuantizedLinear):
    scheme = "int4"
    bits = 4

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, input_scale: torch.Tensor | None = None):
        out_features, in_features = qweight.shape[0], qweight.shape[1] * 2
        super().__init__(in_features, out_features, group_size, bias)
        self.register_buffer("qweight", qweight)  # (out, in / 2) uint8: low nibble = even column
        self.register_buffer("scales", scales)  # (out, in / group)
        self.register_buffer("zeros", zeros)  # (out, in / group)
        # AWQ-style (see awq.py): the codes quantize W * diag(1 / input_scale); x is multiplied by it first
        self.register_buffer("input_scale", input_scale)  # (in,) or None

    @classmethod
    def check(cls, in_features: int, out_features: int, group_size: int) -> str | None:
        if group_size not in GROUP_SIZES:
            return f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}"
        if in_features % group_size:
            return f"int4 group size {group_size} does not divide in_features {in_features}"
        return None

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                   input_scale: torch.Tensor | None = None) -> "Int4Linear":
        if input_scale is not None:  # W x = (W / input_scale) (input_scale * x), per input channel
            input_scale = input_scale.to(weight.dtype)  # rounded first: the kernel multiplies by this one
            weight = (weight.float() / input_scale.float()[None, :]).to(weight.dtype)
        codes, scales, zeros = quantize_groups(weight, group_size)
        return cls.from_codes(codes, scales, zeros, group_size, bias, input_scale)

    @classmethod
    def from_codes(cls, codes, scales, zeros, group_size: int, bias, input_scale=None) -> "Int4Linear":
        """codes (out, in) int in [0, 15]; scales, zeros (out, in / group) in the compute dtype."""
        codes = codes.to(torch.uint8)
        qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()  # (out, in / 2)
        return cls(qweight, scales.contiguous(), zeros.contiguous(), group_size, bias, input_scale)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], group_size: int) -> "Int4Linear":
        return cls(state["qweight"], state["scales"].contiguous(), state["zeros"].contiguous(), group_size,
                   state.get("bias"), state.get("input_scale"))

    def portable_state(self) -> dict[str, torch.Tensor]:
        state = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        state |= {"input_scale": self.input_scale} if self.input_scale is not None else {}
        return state | ({"bias": self.bias} if self.bias is not None else {})

    def scale_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def _codes(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, in / 2) code bytes -> (T, in) codes in [0, 15] (uint8)."""
        return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], self.in_features)

    def _grid(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """codes (T, in), scales and zeros (T, in / group) -> (T, in) float32 codes-space weights."""
        return dequantize_groups(codes, scales, zeros, self.group_size)

    def _weights(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
        """The layer's (T, in) weights in the scale dtype (times input_scale, if any)."""
        return self._unscale(self._grid(codes, scales, zeros)).to(self.scale_dtype())

    def dequantize(self) -> torch.Tensor:
        return self._weights(self._codes(self.qweight), self.scales, self.zeros)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.long()
        return self._weights(self._codes(self.qweight[rows]), self.scales[rows], self.zeros[rows])

    def _unscale(self, w: torch.Tensor) -> torch.Tensor:
        """Codes-space weights (float32, (..., in)) -> the layer's weights (times input_scale, if any)."""
        return w if self.input_scale is None else w * self.input_scale.float()

    def step_sizes(self) -> torch.Tensor:
        return self._unscale(self.scales.float().repeat_interleave(self.group_size, dim=1))  # (out, in)

    def _rounds_inputs(self, x2d: torch.Tensor) -> bool:
        """Whether this call runs leanlm's kernel (which takes 64 inputs a step and rounds them to int8)."""
        return x2d.device.type == "cpu" and self.in_features % 64 == 0 and kernels.available()

    def _kernel_inputs(self, x2d: torch.Tensor) -> torch.Tensor:
        return x2d if self.input_scale is None else x2d * self.input_scale  # (tokens, in), in x's dtype

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        x2d = self._kernel_inputs(x2d)
        if self._rounds_inputs(x2d):
            return torch.ops.leanlm.linear_int4(x2d, self.qweight, self.scales, self.zeros, self.group_size, None)
        return F.linear(x2d, self._grid(self._codes(self.qweight), self.scales, self.zeros).to(x2d.dtype))


@torch.no_grad()
def quantize_groups(weight: torch.Tensor, group_size: int, clip: torch.Tensor | float = 1.0):
    """Round-to-nearest asymmetric 4-bit codes of a (out, in) weight: codes, scales, zeros.

    The grid of each group spans its [min, max] (times ``clip``, a per-group or scalar shrink <= 1
    for a clipping search). Scales are rounded *up* to the weight's dtype and the scale is at least
    |min| * eps * 1.1, so after the zero point is rounded to that dtype every unclipped weight still
    lies within half a step of the grid: |w - w_hat| <= scale / 2.
    """
    dtype = weight.dtype
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)  # (out, groups, g)
    low, high = w.amin(-1) * clip, w.amax(-1) * clip  # (out, groups)
    eps = torch.finfo(dtype).eps
    raw = torch.maximum((high - low) / 15, low.abs() * eps * 1.1).clamp_min(1e-8)
    scale = round_up_scale(raw, dtype)  # (out, groups)
    zero = (low + 8 * scale.float()).to(dtype)  # dequantized code 0 is zero - 8 * scale ~= low
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None]) + 8
    codes = q.clamp_(0, 15).to(torch.uint8).reshape(out_f, in_f)
    return codes, scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 (out, in) weight of ``quantize_groups``' output: (q - 8) * scale + zero."""
    out_f, in_f = codes.shape
    q = codes.reshape(out_f, in_f // group_size, group_size).float() - 8  # (out, groups, g); 0 rows too
    return (q * scale.float()[..., None] + zero.float()[..., None]).reshape(out_f, in_f)
