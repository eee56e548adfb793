"""Group-wise asymmetric integer quantization with bit packing (the storage under quantized caches).

A tensor's last dimension is cut into groups of ``group`` values; each group keeps a float16 ``scale``
and ``low`` (its minimum), and each value a ``bits``-bit code, ``8 // bits`` codes packed per byte,
so the bytes really shrink. Dequantized value = code × scale + low. Rounding to the nearest code puts
every value within scale / 2 of the original (plus float16 rounding of scale and low): ``error_bound``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanlm.errors import LeanLMError

SUPPORTED_BITS = (2, 4, 8)


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8 (..., groups, group * bits / 8): packed codes
    scale: torch.Tensor  # float16 (..., groups, 1)
    low: torch.Tensor  # float16 (..., groups, 1)
    bits: int
    shape: tuple[int, ...]  # the original shape
    dtype: torch.dtype  # the original dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.low))


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise LeanLMError(f"KV quantization supports {', '.join(map(str, SUPPORTED_BITS))} bits, got {bits}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits along the last dim → 8 // bits codes per byte (first code in the low bits)."""
    per_byte = 8 // bits
    codes = codes.view(*codes.shape[:-1], -1, per_byte).to(torch.uint8)
    packed = torch.zeros(codes.shape[:-1], dtype=torch.uint8, device=codes.device)
    for slot in range(per_byte):
        packed |= codes[..., slot] << (slot * bits)
    return packed


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: (..., n) bytes → (..., n * 8 // bits) codes."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    slots = [(packed >> (slot * bits)) & mask for slot in range(per_byte)]
    return torch.stack(slots, dim=-1).flatten(-2)


def quantize(x: torch.Tensor, bits: int, group: int) -> QuantizedTensor:
    """Quantize ``x`` in groups of ``group`` consecutive values along its last dimension."""
    check_bits(bits)
    if x.shape[-1] % group:
        raise LeanLMError(f"last dimension {x.shape[-1]} is not a multiple of the quantization group {group}")
    grouped = x.float().view(*x.shape[:-1], -1, group)  # (..., groups, group)
    low = grouped.amin(dim=-1, keepdim=True).half()
    high = grouped.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low.float()) / levels).clamp_min(1e-8).half()  # float16, what dequantize will use
    codes = ((grouped - low.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return QuantizedTensor(pack(codes, bits), scale, low, bits, tuple(x.shape), x.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    codes = unpack(q.codes, q.bits).float()  # (..., groups, group)
    return (codes * q.scale.float() + q.low.float()).view(q.shape).to(q.dtype)


def error_bound(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-value bound on |x - dequantize(quantize(x))|: half a step, plus float16 rounding slack."""
    grouped = x.float().view(*x.shape[:-1], -1, group)
    spread = grouped.amax(dim=-1, keepdim=True) - grouped.amin(dim=-1, keepdim=True)
    step = spread / ((1 << bits) - 1)
    magnitude = grouped.abs().amax(dim=-1, keepdim=True)
    # float16 keeps 11 significant bits of scale and low; the result is rounded to x's dtype
    slack = 1e-3 * (magnitude + spread) + torch.finfo(x.dtype).eps * magnitude
    return (step / 2 + slack).expand_as(grouped).reshape(x.shape)


def quantized_bytes_per_value(bits: int, group: int) -> float:
    """Bytes per stored value: the code plus the group's float16 scale and low."""
    return bits / 8 + 4 / group
