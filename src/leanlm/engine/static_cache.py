"""A preallocated KV cache: transformers' ``StaticCache`` (fixed addresses, in-place writes, compilable).

Every layer holds (batch, kv_heads, max_len, head_dim) tensors allocated at the first write; a step
writes its new K/V in place, so a compiled decode step sees the same shapes and storage every time.
Attention runs over all ``max_len`` slots with the unwritten ones masked, so size it to the text
(prompt + new tokens), not to the model's whole context.
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import Cache

from leanlm.errors import LeanLMError


def static_cache(model, max_len: int) -> Cache:
    """A static cache for ``model`` holding up to ``max_len`` tokens per sequence.

    A latent-KV model (``transforms/latent_kv``) caches a latent, not K/V: it gets its growing
    ``LatentCache`` instead (so nothing compiles a step over it; ``stream`` then decodes eagerly).
    """
    if max_len < 1:
        raise LeanLMError(f"a static cache needs room for at least one token, got {max_len}")
    if getattr(model.config, "leanlm_latent_kv", None) is not None:
        from leanlm.kvcache.latent import latent_cache  # lazy: kvcache sits above the engine

        return latent_cache(model)
    return StaticCache(config=model.config, max_cache_len=max_len)


def is_static(cache: Cache | None) -> bool:
    return isinstance(cache, StaticCache)


def capacity(cache: Cache | None) -> int | None:
    """Tokens a static cache can hold (None: grows as needed)."""
    return cache.layers[0].max_cache_len if is_static(cache) else None


def held_bytes(cache: Cache | None) -> int:
    """Bytes of K/V tensors a transformers cache holds (a static cache: its whole preallocation)."""
    if cache is None:
        return 0
    if hasattr(cache, "nbytes"):  # leanlm policy caches count what they really hold
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
