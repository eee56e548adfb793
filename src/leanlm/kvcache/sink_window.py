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
from leanlm.kvcache.base import CachePolicy, PolicyCache, check_budget
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
    def __init__(self, sink: int, window: int, inv_freq: torch.Tensor | None, bits: int | None, group: int,
                 rotate: bool = False):
        super().__init__(sink + window, bits, group, rotate)
        self.sink, self.window = sink, window
        self.inv_freq = inv_freq  # set in "cache" positions mode: keys are re-rotated as they slide

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
