"""H2O (Zhang et al. 2023): keep the recent tokens and the "heavy hitters", the tokens that have
received the most attention so far.

Each step, the attention of the step's queries (captured by a hook, softmax over every held + new
token, causal within the step) is added to each token's running score, per KV head (summed over the
query heads that share it). Over capacity, the last ``recent`` tokens stay and the rest of the room
goes to the best-scored older tokens. The scores are policy state and count in ``nbytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import CachePolicy, check_budget
from leanlm.kvcache.eviction import EvictionLayer, attention_probs, gather_tokens, recent_and_top, tokens_for_budget


SCORE_BYTES = 4  # one float32 accumulated-attention score per held token and KV head


class HeavyHitterLayer(EvictionLayer):
    def __init__(self, capacity: int, recent: int, bits: int | None, group: int, rotate: bool = False):
        super().__init__(capacity, bits, group, rotate)
        self.recent = recent
        self.scores: torch.Tensor | None = None  # (batch, kv_heads, held) accumulated attention, float32

    def observe(self, keys: torch.Tensor, new: int) -> None:
        step = attention_probs(self.queries, keys, new)  # (batch, kv_heads, held + new)
        held = torch.zeros_like(step[..., :0]) if self.scores is None else self.scores
        self.scores = torch.cat([held, torch.zeros_like(step[..., -new:])], dim=-1) + step

    def keep(self, keys: torch.Tensor, new: int) -> torch.Tensor:
        return recent_and_top(self.scores, self.capacity, self.recent)

    def after_eviction(self, index: torch.Tensor) -> None:
        self.scores = gather_tokens(self.scores, index)

    def state_nbytes(self) -> int:
        return 0 if self.scores is None else self.scores.numel() * self.scores.element_size()


@dataclass
class HeavyHitter(CachePolicy):
    """Recent window + top accumulated-attention tokens, ``capacity`` tokens in all."""

    name: ClassVar[str] = "heavy_hitter"
    needs_queries: ClassVar[bool] = True
    capacity: int = 256
    recent_fraction: float = 0.5  # H2O's split: half recent, half heavy hitters
    bits: int | None = None
    group: int = 32
    rotate: bool = True  # with bits: quantize K/V after a Hadamard rotation of head_dim (quant.hadamard)

    def __post_init__(self):
        if self.capacity < 2 or not 0 < self.recent_fraction < 1:
            raise LeanLMError(f"heavy_hitter needs capacity >= 2 and 0 < recent_fraction < 1, got "
                              f"{self.capacity}, {self.recent_fraction}")

    def make_layer(self, layer_idx: int, model: nn.Module) -> HeavyHitterLayer:
        recent = min(self.capacity - 1, max(1, round(self.capacity * self.recent_fraction)))
        return HeavyHitterLayer(self.capacity, recent, self.bits, self.group, bool(self.rotate))

    @classmethod
    def for_budget(cls, budget: float, context: int, bits: int | None = None, head_dim: int | None = None,
                   **settings) -> HeavyHitter:
        check_budget(budget)
        group = settings.get("group", cls.group)
        # at a full budget nothing is evicted (the scores then come on top: the measured bytes say so)
        tokens = context if budget >= 1 and bits is None else \
            tokens_for_budget(budget, context, bits, group, head_dim, state_bytes=SCORE_BYTES)
        return cls(capacity=max(2, tokens), bits=bits, **settings)
