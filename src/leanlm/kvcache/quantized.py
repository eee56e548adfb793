"""KIVI (Liu et al. 2024): 2/3/4/8-bit K and V, keys per channel and values per token.

Keys and values may use different widths (``value_bits``): values tolerate fewer bits than keys.
Once the float16 scales are counted, 4-bit keys with 2- or 3-bit values are the mixes that store 4x
fewer bytes than bf16 (4-bit alone cannot: 0.5 byte + scales per value is over 2 / 4).

Keys have a few outlier channels, so each key channel gets its own scale over a group of ``group``
tokens; values are quantized per token (groups of ``group`` along head_dim), after a Hadamard rotation
of head_dim (``rotate``, QuaRot's trick: one large channel no longer sets the step of the whole
group; at 2 bits this takes the ppl ratio of SmolLM2-135M from 1.07 to 1.01). The newest tokens stay
in full precision in a residual of up to ``residual`` tokens; when it fills, it is quantized as
``residual / group`` key blocks and emptied. Codes are bit-packed (``quant.pack``), so resident bytes
really shrink.

Attention (``fused=True``, the default): decode steps (up to ``fused_queries`` tokens) attend over the
codes themselves through ``fused_kernels.quantized_attention`` (q·k from per-channel key codes, p·v
from per-token value codes, the Hadamard rotation undone once on the output), routed by
``fused.install``; no dequantized copy of the cache exists. Longer steps (a prefill) and
``fused=False`` dequantize the whole cache for attention, a transient copy counted in ``peak``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from leanlm.engine import kernels
from leanlm.errors import LeanLMError
from leanlm.kvcache.base import CachePolicy, FullPrecisionLayer, PolicyLayer, check_budget, tensor_bytes
from leanlm.kvcache import fused_kernels
from leanlm.kvcache.fused import FusedLayer, causal_bias, install
from leanlm.kvcache.quant import (SUPPORTED_BITS, QuantizedTensor, check_bits, check_group, dequantize, hadamard, quantize,
                                  quantized_bytes_per_value)
from leanlm.models.arch import head_dim_of

KERNEL_BITS = {2, 4, 8}  # code widths leanlm::quantized_decode_attention reads (3-bit words go through torch)


def cat_quantized(a: QuantizedTensor | None, b: QuantizedTensor, dim: int, shape_dim: int) -> QuantizedTensor:
    """Join two quantized tensors along a group/token dim of the codes (``dim``) and of the shape."""
    if a is None:
        return b
    shape = list(a.shape)
    shape[shape_dim] += b.shape[shape_dim]
    return dataclasses.replace(a, codes=torch.cat([a.codes, b.codes], dim), scale=torch.cat([a.scale, b.scale], dim),
                               low=torch.cat([a.low, b.low], dim), shape=tuple(shape))


def cat_key_groups(a: QuantizedTensor | None, b: QuantizedTensor) -> QuantizedTensor:
    """Join per-channel key codes (batch, kv_heads, head_dim, groups, bytes) along their token groups,
    stored group-major: the tensors are views of (batch, kv_heads, groups, head_dim, ...) memory, so
    one group's codes and scales are one contiguous block (what the decode kernel reads per task)."""
    def join(x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        parts = [t.transpose(2, 3) for t in (x, y) if t is not None]
        return torch.cat(parts, 2).contiguous().transpose(2, 3)

    shape = list(b.shape)
    shape[3] += 0 if a is None else a.shape[3]
    return dataclasses.replace(b, codes=join(a and a.codes, b.codes), scale=join(a and a.scale, b.scale),
                               low=join(a and a.low, b.low), shape=tuple(shape))


class KiviLayer(FusedLayer, PolicyLayer):
    def __init__(self, bits: int, group: int, residual: int, value_bits: int | None = None, rotate: bool = False):
        super().__init__()
        self.bits, self.group, self.residual, self.rotate = bits, group, residual, rotate
        self.value_bits = value_bits or bits
        self.qkeys: QuantizedTensor | None = None  # shape (batch, kv_heads, head_dim, tokens): per channel, group-major
        self.qvalues: QuantizedTensor | None = None  # shape (batch, kv_heads, tokens, head_dim): per token
        self.keys = self.values = None  # the full-precision residual (batch, kv_heads, <= residual, head_dim)
        self.fused_queries = 16  # steps of up to this many tokens attend over the codes (when fused)

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

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Fused (``fused.install`` in effect, at most ``fused_queries`` tokens): append the step to the
        residual and leave attention to ``attend``; else the plain way (dequantize the whole cache)."""
        if not self.fused or key_states.shape[2] > self.fused_queries:
            return super().update(key_states, value_states, *args, **kwargs)
        self._append_residual(key_states, value_states)
        self.pending, self.queries = True, None
        return key_states, value_states

    def _append_residual(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The step's K/V (batch, kv_heads, q, head_dim) join the full-precision residual (contiguous)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys is not None and self.keys.shape[2]
        self.keys = torch.cat([self.keys, key_states], 2) if held else key_states.contiguous()  # (batch, kv_heads, R + q, head_dim)
        self.values = torch.cat([self.values, value_states], 2) if held else value_states.contiguous()
        self.seen += key_states.shape[2]
        self.peak = max(self.peak, self.nbytes())  # the step's K/V are now resident; attention adds no (tokens, d) copy

    def attend(self, module: nn.Module, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention over the codes (``fused_kernels.quantized_attention``) and the residual, then the
        residual's whole blocks are quantized (what ``store`` does on the plain path)."""
        batch, heads, q_len, dim = query.shape
        kv_heads = self.keys.shape[1]
        q = query.float().reshape(batch, kv_heads, heads // kv_heads * q_len, dim) * scaling  # (b, h, group * q, d)
        bias = causal_bias(q_len, self.held_tokens(), mask, heads // kv_heads, query.device)
        if self.qkeys is None:
            out, _ = fused_kernels.run(fused_kernels.dense_attention, q, self.keys, self.values, bias)
        else:
            qk, qv = self.qkeys, self.qvalues
            rot = hadamard(dim).to(query.device) if qv.rotated else None
            out, _ = fused_kernels.run(fused_kernels.quantized_attention, q, (qk.codes, qk.scale, qk.low),
                                       (qv.codes, qv.scale, qv.low), rot, self.keys, self.values, bias,
                                       key_bits=qk.bits, value_bits=qv.bits, keys_per_channel=True)
        self.pending = False
        self.store(self.keys, self.values, new=0)
        return out.view(batch, heads, q_len, dim).to(query.dtype)

    def lean_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decode step for ``engine/lean_step``: query (batch, heads, head_dim) and the step's key/value
        (batch, kv_heads, head_dim) → attention output (batch, heads, head_dim). The new K/V join the
        residual, attention reads the codes (``leanlm::quantized_decode_attention``, else ``attend``'s
        torch path), then whole residual blocks are quantized as on every other path."""
        self._append_residual(key[:, :, None], value[:, :, None])
        out = self._kernel_attention(query, scaling)
        if out is None:
            self.pending = True
            out = self.attend(None, query[:, :, None], None, scaling)[:, :, 0]  # stores the residual itself
        else:
            self.store(self.keys, self.values, new=0)
        return out

    def _kernel_attention(self, query: torch.Tensor, scaling: float) -> torch.Tensor | None:
        """leanlm's C++ kernel over the codes and residual, or None where it does not apply."""
        if not kernels.available() or query.device.type != "cpu" or query.shape[-1] % 8 or query.shape[-1] > 256:
            return None
        if self.qkeys is None:  # nothing quantized yet: the residual is a plain cache
            length = torch.tensor([self.keys.shape[2]])
            return torch.ops.leanlm.decode_attention(query, self.keys, self.values, length, None, scaling)
        qk, qv = self.qkeys, self.qvalues
        if not {qk.bits, qv.bits} <= KERNEL_BITS or qk.codes.shape[-1] % 8 or qv.codes.shape[-1] % 8:
            return None
        rot = hadamard(query.shape[-1]) if qv.rotated else None
        return torch.ops.leanlm.quantized_decode_attention(query, qk.codes, qk.scale, qk.low, qv.codes, qv.scale, qv.low,
                                                          rot, self.keys, self.values, qk.bits, qv.bits, scaling,
                                                          bool(kernels.int8_attention))

    def store(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        held_residual = 0 if self.keys is None else self.keys.shape[2]
        tail_k, tail_v = keys[:, :, -(held_residual + new):], values[:, :, -(held_residual + new):]
        full = (tail_k.shape[2] // self.residual) * self.residual  # whole residuals to quantize now
        if not full and new == 0:  # the residual is already exactly these tensors (a decode step): nothing to do
            return
        if full:
            block_k = tail_k[:, :, :full].transpose(2, 3).contiguous()  # (batch, kv_heads, head_dim, full)
            self.qkeys = cat_key_groups(self.qkeys, quantize(block_k, self.bits, self.group))
            self.qvalues = cat_quantized(self.qvalues, quantize(tail_v[:, :, :full], self.value_bits, self.group, self.rotate),
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
    value_bits: int | None = None  # None: the same as bits
    rotate: bool = True  # values (quantized per token) after a Hadamard rotation of head_dim (quant.hadamard)
    fused: bool = True  # decode steps attend over the codes (fused_kernels), not over a dequantized copy
    fused_queries: int = 16  # steps of at most this many tokens go fused; longer ones (prefill) dequantize once

    def __post_init__(self):
        if self.bits != 16:
            for bits in (self.bits, self.value_bits or self.bits):
                check_bits(bits)
                check_group(bits, self.group)
        if self.group < 1 or self.residual < self.group or self.residual % self.group:
            raise LeanLMError(f"quantized needs residual to be a positive multiple of group, got "
                              f"group={self.group}, residual={self.residual}")

    def make_layer(self, layer_idx: int, model: nn.Module) -> PolicyLayer:
        if self.bits == 16:
            return FullPrecisionLayer()
        head_dim = head_dim_of(model.config)
        if head_dim % self.group:
            raise LeanLMError(f"head_dim {head_dim} is not a multiple of the quantization group {self.group}")
        layer = KiviLayer(self.bits, self.group, self.residual, self.value_bits, bool(self.rotate))
        layer.fused_queries = self.fused_queries
        return layer

    def hooks(self, model: nn.Module, cache) -> list:
        return [install(model, cache)] if self.fused and self.bits != 16 else []

    def nominal_fraction(self, context: int) -> float:
        """Bytes held for a ``context``-token text / the bf16 cache's, before any measurement."""
        if self.bits == 16:
            return 1.0
        per_pair = quantized_bytes_per_value(self.bits, self.group) + \
            quantized_bytes_per_value(self.value_bits or self.bits, self.group)  # one K value + one V value
        exact = min(self.residual, context)
        return ((context - exact) * per_pair + exact * 4) / (context * 4)

    @classmethod
    def for_budget(cls, budget: float, context: int, **settings) -> Quantized:
        """The most bits whose nominal bytes at ``context`` tokens fit the budget (the fewest if none do).

        Candidates: equal or lower value bits than key bits, groups of 32 or 64 (unless ``group`` is
        given), a 64-token residual (unless ``residual`` is given).
        """
        check_budget(budget)
        settings.pop("head_dim", None)  # sizing is per value: head_dim does not enter it
        if budget >= 1:
            settings.pop("bits", None)
            return cls(bits=16, **settings)
        groups = (settings.pop("group"),) if "group" in settings else (32, 64)
        residual = settings.pop("residual", 64)
        key_bits = (settings.pop("bits"),) if "bits" in settings else SUPPORTED_BITS
        value_bits = (settings.pop("value_bits"),) if settings.get("value_bits") else None
        candidates = [cls(bits=k, value_bits=v, group=g, residual=residual, **settings)
                      for k in key_bits for v in (value_bits or [b for b in SUPPORTED_BITS if b <= k])
                      for g in groups]
        fitting = [c for c in candidates if c.nominal_fraction(context) <= budget]
        if not fitting:
            return min(candidates, key=lambda c: c.nominal_fraction(context))
        # most bits first (keys weigh more), then the finer group
        return max(fitting, key=lambda c: (c.bits + c.value_bits, c.bits, -c.group))
