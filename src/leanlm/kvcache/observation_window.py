"""SnapKV (Li et al. 2024): rank held tokens by the attention the most recent queries pay them.

Over capacity, the last ``window`` queries (the observation window: the end of the prompt after a
prefill, a rolling buffer of the latest queries during decoding) score every older token; the scores
are summed over the window and the KV group's query heads, smoothed by average pooling (``kernel``)
so neighbours of an important token survive with it, and each KV head keeps its own top tokens plus
the window itself. The query buffer is policy state and counts in ``nbytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import CachePolicy, check_budget, tensor_bytes
from leanlm.kvcache.eviction import EvictionLayer, attention_probs, recent_and_top, tokens_for_budget


class ObservationWindowLayer(EvictionLayer):
    def __init__(self, capacity: int, window: int, kernel: int, bits: int | None, group: int, rotate: bool = False):
        super().__init__(capacity, bits, group, rotate)
        self.window, self.kernel = window, kernel
        self.recent_queries: torch.Tensor | None = None  # (batch, heads, <= window, head_dim)

    def observe(self, keys: torch.Tensor, new: int) -> None:
        queries = self.queries if self.recent_queries is None else torch.cat([self.recent_queries, self.queries], 2)
        self.recent_queries = queries[:, :, -self.window:]

    def keep(self, keys: torch.Tensor, new: int) -> torch.Tensor:
        # Every token older than the window lies in the past of every buffered query: no mask needed,
        # and the window's own tokens are kept whatever their score.
        scores = attention_probs(self.recent_queries, keys, new=0)  # (batch, kv_heads, tokens)
        if self.kernel > 1:
            scores = F.avg_pool1d(scores, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
        return recent_and_top(scores, self.capacity, min(self.window, self.capacity - 1))

    def state_nbytes(self) -> int:
        return tensor_bytes(self.recent_queries)


@dataclass
class ObservationWindow(CachePolicy):
    """SnapKV-style eviction: the last ``window`` queries vote, pooled over ``kernel`` tokens."""

    name: ClassVar[str] = "observation_window"
    needs_queries: ClassVar[bool] = True
    capacity: int = 256
    window: int = 32
    kernel: int = 7
    bits: int | None = None
    group: int = 32
    rotate: bool = True  # with bits: quantize K/V after a Hadamard rotation of head_dim (quant.hadamard)

    def __post_init__(self):
        if self.capacity < 2 or self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise LeanLMError("observation_window needs capacity >= 2, window >= 1 and an odd kernel >= 1, got "
                              f"{self.capacity}, {self.window}, {self.kernel}")

    def make_layer(self, layer_idx: int, model: nn.Module) -> ObservationWindowLayer:
        return ObservationWindowLayer(self.capacity, self.window, self.kernel, self.bits, self.group, bool(self.rotate))

    @classmethod
    def for_budget(cls, budget: float, context: int, bits: int | None = None, head_dim: int | None = None,
                   **settings) -> ObservationWindow:
        check_budget(budget)
        capacity = max(2, tokens_for_budget(budget, context, bits, settings.get("group", 32), head_dim))
        return cls(capacity=capacity, window=min(32, capacity // 2 or 1), bits=bits, **settings)
