"""KIVI (Liu et al. 2024): 2/4/8-bit K and V, keys per channel and values per token.

Keys have a few outlier channels, so each key channel gets its own scale over a group of ``group``
tokens; values are quantized per token (groups of ``group`` along head_dim). The newest tokens stay in
full precision in a residual of up to ``residual`` tokens; when it fills, it is quantized as
``residual / group`` key blocks and emptied. Codes are bit-packed (``quant.pack``), so resident bytes
really shrink; every step dequantizes the whole cache for attention, a transient copy counted in
``peak``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import CachePolicy, FullPrecisionLayer, PolicyLayer, check_budget, tensor_bytes
from leanlm.kvcache.quant import SUPPORTED_BITS, QuantizedTensor, check_bits, dequantize, quantize, quantized_bytes_per_value


def cat_quantized(a: QuantizedTensor | None, b: QuantizedTensor, dim: int, shape_dim: int) -> QuantizedTensor:
    """Join two quantized tensors along a group/token dim of the codes (``dim``) and of the shape."""
    if a is None:
        return b
    shape = list(a.shape)
    shape[shape_dim] += b.shape[shape_dim]
    return QuantizedTensor(torch.cat([a.codes, b.codes], dim), torch.cat([a.scale, b.scale], dim),
                           torch.cat([a.low, b.low], dim), a.bits, tuple(shape), a.dtype)


class KiviLayer(PolicyLayer):
    def __init__(self, bits: int, group: int, residual: int):
        super().__init__()
        self.bits, self.group, self.residual = bits, group, residual
        self.qkeys: QuantizedTensor | None = None  # shape (batch, kv_heads, head_dim, tokens): per channel
        self.qvalues: QuantizedTensor | None = None  # shape (batch, kv_heads, tokens, head_dim): per token
        self.keys = self.values = None  # the full-precision residual (batch, kv_heads, <= residual, head_dim)

    def materialize(self):
        parts_k, parts_v = [], []
        if self.qkeys is not None:
            parts_k.append(dequantize(self.qkeys).transpose(2, 3))
            parts_v.append(dequantize(self.qvalues))
        if self.keys is not None and self.keys.shape[2]:
            parts_k.append(self.keys)
            parts_v.append(self.values)
        if not parts_k:
            return None, None
        return torch.cat(parts_k, 2), torch.cat(parts_v, 2)

    def store(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        held_residual = 0 if self.keys is None else self.keys.shape[2]
        tail_k, tail_v = keys[:, :, -(held_residual + new):], values[:, :, -(held_residual + new):]
        full = (tail_k.shape[2] // self.residual) * self.residual  # whole residuals to quantize now
        if full:
            block_k = tail_k[:, :, :full].transpose(2, 3).contiguous()  # (batch, kv_heads, head_dim, full)
            self.qkeys = cat_quantized(self.qkeys, quantize(block_k, self.bits, self.group), dim=3, shape_dim=3)
            self.qvalues = cat_quantized(self.qvalues, quantize(tail_v[:, :, :full], self.bits, self.group),
                                         dim=2, shape_dim=2)
        # clone: a view would keep the whole step's K/V tensor alive
        self.keys, self.values = tail_k[:, :, full:].clone(), tail_v[:, :, full:].clone()

    def held_tokens(self) -> int:
        quantized = 0 if self.qkeys is None else self.qkeys.shape[3]
        return quantized + (0 if self.keys is None else self.keys.shape[2])

    def nbytes(self) -> int:
        quantized = sum(q.nbytes() for q in (self.qkeys, self.qvalues) if q is not None)
        return quantized + tensor_bytes(self.keys, self.values)


@dataclass
class Quantized(CachePolicy):
    """KIVI-style quantized cache: ``bits`` per value, groups of ``group``, ``residual`` recent tokens exact."""

    name: ClassVar[str] = "quantized"
    bits: int = 4  # 2, 4, 8; or 16: nothing quantized (the full cache, for a 100% budget)
    group: int = 32
    residual: int = 128

    def __post_init__(self):
        if self.bits != 16:
            check_bits(self.bits)
        if self.group < 1 or self.residual < self.group or self.residual % self.group:
            raise LeanLMError(f"quantized needs residual to be a positive multiple of group, got "
                              f"group={self.group}, residual={self.residual}")

    def make_layer(self, layer_idx: int, model: nn.Module) -> PolicyLayer:
        if self.bits == 16:
            return FullPrecisionLayer()
        head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else \
            model.config.hidden_size // model.config.num_attention_heads
        if head_dim % self.group:
            raise LeanLMError(f"head_dim {head_dim} is not a multiple of the quantization group {self.group}")
        return KiviLayer(self.bits, self.group, self.residual)

    @classmethod
    def for_budget(cls, budget: float, context: int, **settings) -> Quantized:
        """The widest bit width whose nominal bytes fit the budget (the narrowest if none does)."""
        check_budget(budget)
        if budget >= 1:
            return cls(bits=16, **settings)
        group = settings.get("group", 32)
        fitting = [b for b in SUPPORTED_BITS if quantized_bytes_per_value(b, group) / 2 <= budget]
        return cls(bits=max(fitting) if fitting else min(SUPPORTED_BITS), **settings)
