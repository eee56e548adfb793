"""The KV cache of a latent-KV model (``transforms/latent_kv``): per layer, the joint K/V latent and the
RoPE part of the keys, nothing else.

A ``LatentAttention`` module hands its cache ``update(latent, rope_keys)`` instead of ``update(keys,
values)``: ``latent`` is (batch, seq, rank), ``rope_keys`` (batch, kv_heads, seq, 2 × rope_pairs).
Both grow along dim -2 (the sequence), so a plain transformers ``DynamicLayer`` (what ``generate``
makes when given no cache) already holds only these two tensors; ``LatentLayer`` is that layer with
names for them and ``nbytes()``. ``LatentCache`` is the transformers ``Cache`` built of them, with
``nbytes()`` summed over layers (the same contract as ``kvcache.base.PolicyCache``).

Full-size keys and values never enter the cache: prefill may expand them for its own attention, and
decode attends over the latent directly (see ``LatentAttention``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from leanlm.kvcache.base import tensor_bytes


class LatentLayer(DynamicLayer):
    """One decoder layer's latent cache: ``keys`` holds the latent, ``values`` the RoPE keys."""

    @property
    def latent(self) -> torch.Tensor | None:
        """(batch, seq, rank), or None before the first update."""
        return self.keys if self.is_initialized else None

    @property
    def rope_keys(self) -> torch.Tensor | None:
        """(batch, kv_heads, seq, 2 × rope_pairs), post-RoPE, or None before the first update."""
        return self.values if self.is_initialized else None

    def held_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.latent, self.rope_keys) if t is not None]

    def nbytes(self) -> int:
        """Bytes of every tensor this layer keeps between steps."""
        return tensor_bytes(*self.held_tensors())

    def held_tokens(self) -> int:
        return self.get_seq_length()


class LatentCache(Cache):
    """A transformers Cache of ``LatentLayer``s, one per decoder layer."""

    def __init__(self, num_layers: int):
        super().__init__(layers=[LatentLayer() for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def held_tokens(self) -> int:
        return max((layer.held_tokens() for layer in self.layers), default=0)


def latent_cache(model: nn.Module) -> LatentCache:
    """A fresh empty ``LatentCache`` for a latent-KV model (one layer per decoder block)."""
    return LatentCache(model.config.num_hidden_layers)


def cache_layer_ok(layer) -> bool:
    """Whether a cache layer can hold a latent layer's (latent, rope keys): it must append along dim -2
    and keep what it is given (a plain or latent dynamic layer; not a static, sliding or policy layer)."""
    return type(layer) in (DynamicLayer, LatentLayer)


__all__ = ["LatentCache", "LatentLayer", "cache_layer_ok", "latent_cache"]
