"""int4 weights, asymmetric, one (scale, zero) per group of ``group_size`` inputs of each output row.

``w ~= (q - 8) * scale + zero`` with q in [0, 15], the convention of ATen's CPU kernel
``_weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)``, which reads 4-bit codes
packed by ``_convert_weight_to_int4pack_for_cpu`` (a quarter of the bytes of bf16 per step).

That packed layout is the kernel's own: rows go in blocks of B (64 in ATen's AVX512 build, 32 in its
AVX2 build: ``packed_block`` reads it off the kernel); inside a full block, byte (k, j) holds row j
(low nibble) and row j + B/2 (high nibble) of column k; a last block of fewer rows pairs rows 2j
and 2j + 1. ``_kernel_rows`` reads rows back from it (the tied embedding and
``dequantize`` need them); a test checks it against the kernel's own products. Checkpoints hold a
plain layout instead (``portable_state``), re-packed at load, so they do not depend on it.
"""

from __future__ import annotations

import functools

import torch

from leanlm.transforms.quantize.base import QuantizedLinear, register, round_up_scale

GROUP_SIZES = (32, 64, 128, 256)  # what the CPU kernel accepts


@functools.cache
def packed_block() -> int:
    """Rows per block of the kernel's packed layout: ATen's AVX512 build packs 64, its AVX2 build 32.

    Read off the kernel itself: pack rows whose codes are their own index (mod 16, and its 16s) and see
    which row shares the first byte with row 0 (its high nibble holds row B / 2)."""
    rows = torch.arange(128, dtype=torch.int32)[:, None].expand(128, 32).contiguous()
    low = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows % 16, 1).reshape(-1)[0]
    high = torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows // 16, 1).reshape(-1)[0]
    partner = int(low >> 4) + 16 * int(high >> 4)  # the row in byte 0's high nibble
    return 2 * partner


@register
class Int4Linear(QuantizedLinear):
    scheme = "int4"
    bits = 4

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None = None):
        out_features, in_features = packed.shape[0], packed.shape[1] * 2
        super().__init__(in_features, out_features, group_size, bias)
        self.register_buffer("packed", packed)  # (out, in / 2) uint8, the kernel's layout
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (in / group, out, 2)
        # AWQ-style (see awq.py): the codes quantize W * diag(1 / input_scale); x is multiplied by it first
        self.register_buffer("input_scale", input_scale)  # (in,) or None

    @classmethod
    def check(cls, in_features: int, out_features: int, group_size: int) -> str | None:
        if group_size not in GROUP_SIZES:
            return f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}"
        if in_features % group_size:
            return f"int4 group size {group_size} does not divide in_features {in_features}"
        if out_features % 16:
            return f"int4 needs out_features divisible by 16, got {out_features}"
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
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).cpu().contiguous(), 1)
        sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (in / group, out, 2)
        return cls(packed.to(scales.device), sz, group_size, bias, input_scale)

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], group_size: int) -> "Int4Linear":
        plain = state["qweight"]  # (out, in / 2) uint8: low nibble = even column, high = odd column
        codes = torch.stack([plain & 0xF, plain >> 4], dim=-1).reshape(plain.shape[0], -1)  # (out, in)
        return cls.from_codes(codes, state["scales"], state["zeros"], group_size, state.get("bias"), state.get("input_scale"))

    def portable_state(self) -> dict[str, torch.Tensor]:
        codes = self._all_codes()  # (out, in)
        plain = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)  # (out, in / 2)
        scales, zeros = self.scales_and_zeros.transpose(0, 1).unbind(-1)  # (out, in / group) each
        state = {"qweight": plain, "scales": scales.contiguous(), "zeros": zeros.contiguous()}
        state |= {"input_scale": self.input_scale} if self.input_scale is not None else {}
        return state | ({"bias": self.bias} if self.bias is not None else {})

    def scale_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def _kernel_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The 4-bit codes of rows ``rows`` (T,) read from the kernel's packed layout -> (T, in) int64."""
        block = packed_block()
        n_full = self.out_features // block * block
        rows = rows.long()
        in_full = rows < n_full
        tail = self.out_features - n_full  # rows of the last, smaller block (0 when none)
        block_start = torch.where(in_full, rows // block * block, torch.full_like(rows, n_full))
        width = torch.where(in_full, torch.full_like(rows, block), torch.full_like(rows, max(tail, 1)))  # rows in block
        r = rows - block_start
        col = torch.where(in_full, r % (block // 2), r // 2)  # byte column inside the block
        high = torch.where(in_full, r >= block // 2, r % 2 == 1)  # high nibble?
        k = torch.arange(self.in_features, device=rows.device)
        # byte offset = block_start * in / 2 + k * width / 2 + col
        offset = (block_start * self.in_features // 2)[:, None] + k[None, :] * (width // 2)[:, None] + col[:, None]  # (T, in)
        byte = self.packed.reshape(-1)[offset].long()
        return torch.where(high[:, None], byte >> 4, byte & 0xF)

    def _all_codes(self) -> torch.Tensor:
        """Every row's codes (out, in) uint8, unpacked with reshapes (no gather): the fast full path."""
        block = packed_block()
        n_full, k = self.out_features // block * block, self.in_features
        parts = []
        if n_full:
            blocks = self.packed.reshape(-1)[: n_full * k // 2].reshape(n_full // block, k, block // 2)  # (nb, in, block / 2)
            both = torch.cat([blocks & 0xF, blocks >> 4], dim=-1)  # (nb, in, block): rows j then j + block / 2
            parts.append(both.permute(0, 2, 1).reshape(n_full, k))
        if n_full < self.out_features:
            tail = self.packed.reshape(-1)[n_full * k // 2 :].reshape(k, -1)  # (in, tail / 2)
            both = torch.stack([tail & 0xF, tail >> 4], dim=-1)  # (in, tail / 2, 2): rows 2j, 2j + 1
            parts.append(both.reshape(k, -1).T)
        return torch.cat(parts)

    def dequantize(self) -> torch.Tensor:
        scale, zero = self.scales_and_zeros.float().unbind(-1)  # (in / group, out) each
        codes = self._all_codes().reshape(self.out_features, -1, self.group_size).float() - 8  # (out, groups, g)
        w = (codes * scale.T[..., None] + zero.T[..., None]).reshape(self.out_features, self.in_features)
        return self._unscale(w).to(self.scale_dtype())

    def _unscale(self, w: torch.Tensor) -> torch.Tensor:
        """Codes-space weights (float32, (..., in)) -> the layer's weights (times input_scale, if any)."""
        return w if self.input_scale is None else w * self.input_scale.float()

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        codes = self._kernel_rows(rows)  # (T, in)
        sz = self.scales_and_zeros[:, rows.long()]  # (in / group, T, 2)
        scale = sz[..., 0].float().T.repeat_interleave(self.group_size, dim=1)  # (T, in)
        zero = sz[..., 1].float().T.repeat_interleave(self.group_size, dim=1)
        return self._unscale((codes - 8).float() * scale + zero).to(self.scale_dtype())

    def step_sizes(self) -> torch.Tensor:
        return self._unscale(self.scales_and_zeros[..., 0].float().T.repeat_interleave(self.group_size, dim=1))  # (out, in)

    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x2d = x2d * self.input_scale  # (tokens, in)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group_size, self.scales_and_zeros)


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
    q = codes.reshape(out_f, -1, group_size).float() - 8  # (out, groups, g)
    return (q * scale.float()[..., None] + zero.float()[..., None]).reshape(out_f, in_f)
