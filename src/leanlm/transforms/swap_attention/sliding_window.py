"""Sliding-window attention with attention sinks: each token sees the first ``sink`` tokens and the last
``window`` (itself included). The layer's cache holds at most ``sink + window - 1`` tokens
(``kvcache.swapped.WindowLayer``), so its memory and its per-token cost stop growing with the text.

With ``window`` >= the text length it is exactly the original causal attention (tested).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from leanlm.kvcache.swapped import WindowLayer, cache_layer
from leanlm.transforms.swap_attention.base import ReplacementSettings, SwappedAttention, register_replacement


def window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """(q, kv) bool, True where query i may see key j: causal, and j a sink or within the last ``window``."""
    q, k = query_pos[:, None], key_pos[None, :]
    return (k <= q) & ((k < sink) | (k > q - window))


def windowed_attention(queries, keys, values, query_pos, key_pos, sink: int, window: int, scaling: float):
    """Softmax attention under ``window_mask``; GQA keys/values are shared by their query heads.

    queries (b, heads, q, d); keys/values (b, kv_heads, kv, d) -> (b, heads, q, d).
    """
    mask = window_mask(query_pos, key_pos, sink, window).to(queries.device)  # (q, kv)
    return F.scaled_dot_product_attention(queries, keys.to(queries.dtype), values.to(queries.dtype), attn_mask=mask,
                                          scale=scaling, enable_gqa=keys.shape[1] != queries.shape[1])


def local_kv(module: SwappedAttention, cache, keys, values, make):
    """This step's keys/values (held + new), their text indices and the queries' indices; no cache: the input alone."""
    layer = cache_layer(cache, module.layer_idx, make)
    if layer is None:
        positions = torch.arange(keys.shape[-2])
        return keys, values, positions, positions, None
    keys, values, key_pos, query_pos = layer.attend(keys, values)
    return keys, values, key_pos, query_pos, layer


@register_replacement
class SlidingWindowAttention(SwappedAttention):
    """The original attention restricted to ``sink`` first + ``window`` last tokens; no new parameters."""

    kind: ClassVar[str] = "sliding_window"
    Settings: ClassVar[type[ReplacementSettings]] = ReplacementSettings

    def attend(self, hidden, position_embeddings, cache) -> torch.Tensor:
        queries, keys, values = self.qkv(hidden, position_embeddings)  # (b, h, q, d), (b, kv, q, d) x2
        s = self.settings
        keys, values, key_pos, query_pos, _ = local_kv(self, cache, keys, values, lambda: WindowLayer(s.sink, s.window))
        out = windowed_attention(queries, keys, values, query_pos, key_pos, s.sink, s.window, self.scaling)
        return out.transpose(1, 2).reshape(*hidden.shape[:-1], -1)  # (b, q, heads * d)


__all__ = ["SlidingWindowAttention", "window_mask", "windowed_attention", "local_kv"]
