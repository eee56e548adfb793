"""A fixed-capacity token buffer that eviction overwrites in place (no per-step gather of the cache).

``SlotStore`` holds ``capacity`` slots per KV head, allocated once, full precision or quantized per
token (groups along head_dim, optionally after a Hadamard rotation, as ``eviction.QuantStore``). A
decode step writes the new token into one slot (``write``) and may first copy one token to another
slot, a different one per head (``move``): O(one token) per step instead of O(cache). Slots are not
in text order; attention does not care (RoPE is already in the keys), and the owner keeps whatever
order it needs. ``nbytes`` is the whole allocation: every slot is held from the first step.
"""

from __future__ import annotations

import torch

from leanlm.kvcache.base import tensor_bytes
from leanlm.kvcache.eviction import concat, gather_tokens, select_quantized
from leanlm.kvcache.quant import QuantizedTensor, check_bits, dequantize, quantize


class SlotStore:
    def __init__(self, capacity: int, bits: int | None = None, group: int = 32, rotate: bool = False):
        if bits is not None:
            check_bits(bits)
        self.capacity, self.bits, self.group, self.rotate = capacity, bits, group, rotate
        self.keys = self.values = None  # (batch, kv_heads, capacity, head_dim) tensors, or QuantizedTensor

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def allocate(self, like: torch.Tensor) -> None:
        """Room for ``capacity`` tokens shaped like ``like`` (batch, kv_heads, *, head_dim)."""
        batch, heads, _, dim = like.shape
        empty = torch.zeros(batch, heads, self.capacity, dim, dtype=like.dtype, device=like.device)
        if self.quantized:
            self.keys, self.values = self._quantize(empty), self._quantize(empty)
        else:
            self.keys, self.values = empty, empty.clone()

    def _quantize(self, x: torch.Tensor) -> QuantizedTensor:
        return quantize(x, self.bits, self.group, self.rotate)

    def _parts(self) -> list[torch.Tensor]:
        if not self.quantized:
            return [self.keys, self.values]
        return [t for q in (self.keys, self.values) for t in (q.codes, q.scale, q.low)]

    def write(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one token, keys/values (batch, kv_heads, 1, head_dim), into ``slot`` (every head)."""
        if self.quantized:
            new = [t for x in (keys, values) for q in [self._quantize(x)] for t in (q.codes, q.scale, q.low)]
        else:
            new = [keys, values]
        for held, item in zip(self._parts(), new):
            held[:, :, slot:slot + 1].copy_(item)

    def move(self, source: int, dest: torch.Tensor) -> None:
        """Copy the token at slot ``source`` to slot ``dest[b, h]`` (batch, kv_heads), per head."""
        for held in self._parts():
            index = dest.view(*dest.shape, 1, *[1] * (held.dim() - 3)).expand(*dest.shape, 1, *held.shape[3:])
            held.scatter_(2, index, held[:, :, source:source + 1].clone())

    def fill(self, keys, values) -> None:
        """Slots [0, n) ← n tokens, as tensors (batch, kv_heads, n, head_dim) or QuantizedTensors."""
        new = [keys, values] if not self.quantized else [t for q in (keys, values) for t in (q.codes, q.scale, q.low)]
        for held, item in zip(self._parts(), new):
            held[:, :, :item.shape[2]].copy_(item)

    def ordered(self, order: torch.Tensor):
        """The tokens at slots ``order`` (1-D), as stored: tensors or QuantizedTensors."""
        index = order.view(1, 1, -1).expand(*self._parts()[0].shape[:2], -1)
        if self.quantized:
            return select_quantized(self.keys, index), select_quantized(self.values, index)
        return gather_tokens(self.keys, index), gather_tokens(self.values, index)

    def extended(self, held, keys: torch.Tensor, values: torch.Tensor):
        """``ordered`` tokens followed by new full-precision ones, in the store's form."""
        if not self.quantized:
            return torch.cat([held[0], keys], 2), torch.cat([held[1], values], 2)
        return concat(held[0], self._quantize(keys)), concat(held[1], self._quantize(values))

    def full_precision(self, stored) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize(stored[0]), dequantize(stored[1])) if self.quantized else stored

    def select(self, stored, index: torch.Tensor):
        """``stored`` (the form ``extended`` returns) at ``index`` (batch, kv_heads, n)."""
        pick = select_quantized if self.quantized else gather_tokens
        return pick(stored[0], index), pick(stored[1], index)

    def view(self, count: int):
        """(keys, values) of slots [0, count): tensors, or (codes, scale, low) triples; views, no copy."""
        if not self.quantized:
            return self.keys[:, :, :count], self.values[:, :, :count]
        return tuple((q.codes[:, :, :count], q.scale[:, :, :count], q.low[:, :, :count]) for q in (self.keys, self.values))

    def nbytes(self) -> int:
        return tensor_bytes(*self._parts()) if self.keys is not None else 0
