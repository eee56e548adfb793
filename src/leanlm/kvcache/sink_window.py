"""StreamingLLM (Xiao et al. 2023): the first ``sink`` tokens ("attention sinks") + the last ``window``.

Positions, two ways (``positions``):
- ``original``: every key keeps the rotary position of its place in the text. Simple, and what
  ``model.generate`` does; but once the text passes the model's trained length, queries sit at
  positions the model never saw.
- ``cache`` (the paper's way): a token's position is its slot in the cache. When the window slides,
  the kept window keys are re-rotated by the shift (RoPE rotations compose), and the next query sits
  at slot sink + window: positions never exceed the cache size, so generation can run forever.
  Pass ``cache.next_position_ids(n)`` as ``position_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import CachePolicy, PolicyCache, check_budget, tensor_bytes
from leanlm.kvcache.eviction import EvictionLayer, tokens_for_budget
from leanlm.models.arch import arch_of


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rerotate(keys: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys rotated as if they sat ``shift`` positions later (HF's rotate_half RoPE layout)."""
    angles = shift * inv_freq.float()  # (head_dim / 2,)
    angles = torch.cat([angles, angles])  # (head_dim,)
    cos, sin = angles.cos().to(keys.dtype), angles.sin().to(keys.dtype)
    return keys * cos + rotate_half(keys) * sin


class SinkWindowLayer(EvictionLayer):
    """Sinks + a rolling window. In full precision with text positions it also takes the engine's lean
    decode step (``lean_attend``): the held tokens move once into a ring of sink + window + 1 slots,
    then each step writes its token over the one the stock path would evict after it and attends
    over the ring with ``leanlm::decode_attention`` — no gather or copy per step. The spare slot is
    there because the stock path attends over held + new before it evicts; ``nbytes`` counts it."""

    def __init__(self, sink: int, window: int, inv_freq: torch.Tensor | None, bits: int | None, group: int,
                 rotate: bool = False):
        super().__init__(sink + window, bits, group, rotate)
        self.sink, self.window = sink, window
        self.inv_freq = inv_freq  # set in "cache" positions mode: keys are re-rotated as they slide
        self.lean_ready = bits is None and inv_freq is None  # see lean_attend
        self.ring: tuple[torch.Tensor, torch.Tensor] | None = None  # (batch, kv_heads, sink + window + 1, head_dim) x2
        self.filled = self.next = 0  # ring slots written; next slot of the window part to overwrite

    def lean_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decode step (``engine/lean_step``): query (batch, heads, dim), the step's key/value (batch, kv_heads, dim)."""
        from leanlm.engine.lean_step import attend  # lazy: the engine sits below the cache policies

        if self.ring is None:  # the first lean step: the held tokens (time order) move into the ring once
            keys, values = self.held.materialize()
            size = (*key.shape[:2], self.capacity + 1, key.shape[-1])
            self.ring = (key.new_zeros(size), value.new_zeros(size))
            self.filled = 0 if keys is None else keys.shape[2]
            if self.filled:
                self.ring[0][:, :, : self.filled] = keys
                self.ring[1][:, :, : self.filled] = values
            self.held.keys = self.held.values = None
        if self.filled <= self.capacity:  # still filling, in time order
            slot, self.filled = self.filled, self.filled + 1
        else:  # full: overwrite the oldest window token
            slot, self.next = self.sink + self.next, (self.next + 1) % (self.window + 1)
        self.ring[0][:, :, slot] = key
        self.ring[1][:, :, slot] = value
        self.seen += 1
        self.peak = max(self.peak, self.nbytes())
        return attend(query, *self.ring, torch.tensor([self.filled]), None, scaling)

    def unroll(self) -> None:
        """Back from the ring to the stock store (time order, at most sink + window tokens), for a stock step."""
        if self.ring is None:
            return
        keys, values = (t[:, :, : self.filled] for t in self.ring)
        if self.filled > self.capacity:  # full: the window part starts at the oldest slot; drop that one
            order = torch.cat([torch.arange(self.sink), self.sink + (self.next + 1 + torch.arange(self.window)) % (self.window + 1)])
            keys, values = keys[:, :, order.to(keys.device)], values[:, :, order.to(keys.device)]
        self.held.keys, self.held.values = keys.contiguous(), values.contiguous()
        self.ring, self.filled, self.next = None, 0, 0

    def update(self, key_states, value_states, *args, **kwargs):
        self.unroll()
        return super().update(key_states, value_states, *args, **kwargs)

    def held_tokens(self) -> int:
        return self.filled if self.ring is not None else super().held_tokens()

    def nbytes(self) -> int:
        return tensor_bytes(*self.ring) if self.ring is not None else super().nbytes()

    def full_precision_tensors(self):
        return list(self.ring) if self.ring is not None else super().full_precision_tensors()

    def reset(self) -> None:
        super().reset()
        self.ring, self.filled, self.next = None, 0, 0

    def keep(self, keys: torch.Tensor, new: int) -> torch.Tensor:
        tokens = self.held.tokens()
        device = keys.device
        index = torch.cat([torch.arange(self.sink, device=device), torch.arange(tokens - self.window, tokens, device=device)])
        return index.expand(keys.shape[0], keys.shape[1], -1)

    def after_eviction(self, index: torch.Tensor) -> None:
        if self.inv_freq is None:
            return
        # The window moved from slots [tokens - window, tokens) down to [sink, sink + window).
        shift = self.sink - int(index[0, 0, self.sink])
        store = self.held
        store.keys = torch.cat([store.keys[:, :, : self.sink], rerotate(store.keys[:, :, self.sink:], shift, self.inv_freq)], 2)


@dataclass
class SinkWindow(CachePolicy):
    """Keep ``sink`` first tokens and a rolling ``window`` of the last ones; never more than sink + window."""

    name: ClassVar[str] = "sink_window"
    sink: int = 4
    window: int = 252
    position_mode: str = "original"  # "original" | "cache" (see the module doc)
    bits: int | None = None  # store kept tokens quantized (per token) at this width
    group: int = 32
    rotate: bool = True  # with bits: quantize K/V after a Hadamard rotation of head_dim (quant.hadamard)

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise LeanLMError(f"sink_window needs sink >= 0 and window >= 1, got sink={self.sink}, window={self.window}")
        if self.position_mode not in ("original", "cache"):
            raise LeanLMError(f"sink_window positions must be 'original' or 'cache', got '{self.position_mode}'")
        if self.position_mode == "cache" and self.bits is not None:
            raise LeanLMError("sink_window with cache positions re-rotates keys, so it needs full-precision storage")

    @property
    def positions(self) -> str:  # what PolicyCache.next_position_ids follows
        return self.position_mode

    def make_layer(self, layer_idx: int, model: nn.Module) -> SinkWindowLayer:
        arch = arch_of(model)
        if self.position_mode == "cache" and any(view.sliding_window for view in arch.attentions()):
            raise LeanLMError(f"sink_window with cache positions is not supported on {arch.family.name}: its "
                              "sliding-window layers place keys by text position; use position_mode='original'")
        inv_freq = arch.inv_freq(layer_idx) if self.position_mode == "cache" else None
        return SinkWindowLayer(self.sink, self.window, inv_freq, self.bits, self.group, bool(self.rotate))

    @classmethod
    def for_budget(cls, budget: float, context: int, bits: int | None = None, head_dim: int | None = None,
                   **settings) -> SinkWindow:
        check_budget(budget)
        capacity = tokens_for_budget(budget, context, bits, settings.get("group", 32), head_dim)
        sink = min(settings.pop("sink", 4), capacity - 1)  # the budget sets the window; sinks may be chosen
        return cls(sink=sink, window=capacity - sink, bits=bits, **settings)


__all__ = ["PolicyCache", "SinkWindow", "SinkWindowLayer", "rerotate"]
