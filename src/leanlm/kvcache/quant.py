"""Group-wise asymmetric integer quantization with bit packing (the storage under quantized caches).

A tensor's last dimension is cut into groups of ``group`` values; each group keeps a float16 ``scale``
and ``low`` (its minimum), and each value a ``bits``-bit code, packed (3-bit codes: 8 in 3 bytes),
so the bytes really shrink. Dequantized value = code × scale + low. Rounding to the nearest code puts
every value within scale / 2 of the original (plus float16 rounding of scale and low): ``error_bound``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from leanlm.errors import LeanLMError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8 (..., groups, group * bits / 8): packed codes
    scale: torch.Tensor  # float16 (..., groups, 1)
    low: torch.Tensor  # float16 (..., groups, 1)
    bits: int
    shape: tuple[int, ...]  # the original shape
    dtype: torch.dtype  # the original dtype
    rotated: bool = False  # codes are of x @ hadamard(last dim): dequantize rotates back

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.low))


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise LeanLMError(f"KV quantization supports {', '.join(map(str, SUPPORTED_BITS))} bits, got {bits}")


def check_group(bits: int, group: int) -> None:
    if group < 1 or group % _codes_per_word(bits):
        raise LeanLMError(f"{bits}-bit codes pack {_codes_per_word(bits)} at a time: the group ({group}) must be a multiple")


def _codes_per_word(bits: int) -> int:
    """Codes in the smallest whole number of bytes that holds a whole number of codes (3 bits: 8 in 3 bytes)."""
    return math.lcm(bits, 8) // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits along the last dim → ``bits / 8`` bytes per code.

    2, 4 and 8 bits are packed in planes: of a row of ``n`` codes, byte ``i`` holds codes ``i``,
    ``i + n/k``, ``i + 2n/k`` ... (k codes a byte, the first in the low bits), so unpacking is a shift
    and a mask of the whole byte row per plane (``planes``), which compiled kernels vectorise. 3-bit
    codes are joined in words of 24 bits (8 codes in 3 bytes, first code in the low bits).
    """
    if bits == 3:
        return _pack_words(codes, bits)
    per_byte = 8 // bits
    planes = codes.view(*codes.shape[:-1], per_byte, -1).to(torch.int32)  # (..., planes, n / k)
    byte = torch.zeros(planes.shape[:-2] + planes.shape[-1:], dtype=torch.int32, device=codes.device)
    for plane in range(per_byte):
        byte |= planes[..., plane, :] << (plane * bits)
    return byte.to(torch.uint8)


def planes(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """The code planes of a 2/4/8-bit packed row: ``torch.cat(planes, -1)`` is ``unpack``."""
    mask = (1 << bits) - 1
    return [(packed >> (plane * bits)) & mask if plane else packed & mask for plane in range(8 // bits)]


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack``: (..., n) bytes → (..., n * 8 // bits) codes."""
    if bits == 3:
        return _unpack_words(packed, bits)
    return packed if bits == 8 else torch.cat(planes(packed, bits), dim=-1)


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = _codes_per_word(bits)
    codes = codes.view(*codes.shape[:-1], -1, per_word).to(torch.int32)
    word = torch.zeros(codes.shape[:-1], dtype=torch.int32, device=codes.device)
    for slot in range(per_word):
        word |= codes[..., slot] << (slot * bits)
    word_bytes = per_word * bits // 8
    packed = torch.stack([(word >> (8 * b)) & 0xFF for b in range(word_bytes)], dim=-1)
    return packed.to(torch.uint8).flatten(-2)


def _unpack_words(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = _codes_per_word(bits)
    word_bytes = per_word * bits // 8
    parts = packed.view(*packed.shape[:-1], -1, word_bytes).to(torch.int32)
    word = torch.zeros(parts.shape[:-1], dtype=torch.int32, device=packed.device)
    for b in range(word_bytes):
        word |= parts[..., b] << (8 * b)
    mask = (1 << bits) - 1
    slots = [(word >> (slot * bits)) & mask for slot in range(per_word)]
    return torch.stack(slots, dim=-1).flatten(-2).to(torch.uint8)


@functools.cache
@functools.lru_cache(maxsize=16)
def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order n (a power of 2), float32, symmetric: H @ H = I.

    Rotating a vector by it spreads one large channel over all channels (QuaRot's trick), so a group's
    range, hence its quantization step, is set by the vector's norm rather than by its outlier.
    """
    if n < 1 or n & (n - 1):
        raise LeanLMError(f"a Hadamard rotation needs a power-of-2 dimension, got {n}")
    # Built once per (n, device) and shared by every call (never written to); a normal tensor even when
    # first asked for under inference_mode, so autograd code can use it later.
    with torch.inference_mode(False):
        h = torch.ones(1, 1, device=device)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / n**0.5


def quantize(x: torch.Tensor, bits: int, group: int, rotate: bool = False) -> QuantizedTensor:
    """Quantize ``x`` in groups of ``group`` consecutive values along its last dimension.

    ``rotate``: quantize ``x @ hadamard(x.shape[-1])`` instead (dequantize undoes it exactly, as the
    matrix is orthonormal; only the quantization error remains, spread evenly over the channels).
    """
    check_bits(bits)
    dtype = x.dtype
    if rotate:
        x = x.float() @ hadamard(x.shape[-1], x.device)
    if x.shape[-1] % group:
        raise LeanLMError(f"last dimension {x.shape[-1]} is not a multiple of the quantization group {group}")
    check_group(bits, group)
    grouped = x.float().view(*x.shape[:-1], -1, group)  # (..., groups, group)
    low = grouped.amin(dim=-1, keepdim=True).half()
    high = grouped.amax(dim=-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low.float()) / levels).clamp_min(1e-8).half()  # float16, what dequantize will use
    codes = ((grouped - low.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)
    return QuantizedTensor(pack(codes, bits), scale, low, bits, tuple(x.shape), dtype, rotate)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    if not q.codes.numel():
        return torch.zeros(q.shape, dtype=q.dtype, device=q.codes.device)
    codes = unpack(q.codes, q.bits).float()  # (..., groups, group)
    x = (codes * q.scale.float() + q.low.float()).reshape(q.shape)  # codes may be a strided view
    if q.rotated:
        x = x @ hadamard(q.shape[-1], x.device)  # H is its own inverse
    return x.to(q.dtype)


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
