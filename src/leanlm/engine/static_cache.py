"""A preallocated KV cache: transformers' ``StaticCache`` (fixed addresses, in-place writes, compilable).

Every layer holds (batch, kv_heads, max_len, head_dim) tensors allocated at the first write; a step
writes its new K/V in place, so a compiled decode step sees the same shapes and storage every time.
Attention runs over all ``max_len`` slots with the unwritten ones masked, so size it to the text
(prompt + new tokens), not to the model's whole context. The sliding-window layers of a swapped
model (``transforms/swap_attention``) get a ring of sink + window slots instead, whatever ``max_len``.
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import Cache

from leanlm.errors import LeanLMError
from leanlm.models.config_keys import SWAP_KEY


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
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    rings = window_layers(model)
    if rings:
        from leanlm.kvcache.swapped import RingWindowLayer  # lazy, as above

        for index, (sink, window) in rings.items():
            cache.layers[index] = RingWindowLayer(sink, window)  # replaced before any storage was allocated
    return cache


def static_copy(model, cache: Cache, max_len: int) -> Cache:
    """The engine's static cache (``static_cache``) holding what a filled DynamicCache holds: full layers'
    K/V copied to their first slots, sliding-window layers as rings (e.g. to time decode after a long
    prefill that was measured through a growing cache)."""
    from leanlm.kvcache.swapped import RingWindowLayer, WindowLayer  # lazy, as above

    static = static_cache(model, max_len)
    for index, layer in enumerate(cache.layers):
        if type(layer) is WindowLayer:
            static.layers[index] = RingWindowLayer.from_window(layer)
        elif isinstance(layer, WindowLayer):
            raise LeanLMError(f"layer {index} is a {type(layer).__name__}: a linear layer's state has no static form")
        else:
            static.update(layer.keys, layer.values, index)
    return static


def window_layers(model) -> dict[int, tuple[int, int]]:
    """Layer index -> (sink, window) of the sliding-window layers a swapped model's config records."""
    record = getattr(model.config, SWAP_KEY, None) or {}
    return {int(index): (int(item["sink"]), int(item["window"])) for index, item in record.items()
            if item.get("kind") == "sliding_window"}


def is_static(cache: Cache | None) -> bool:
    return isinstance(cache, StaticCache)


def capacity(cache: Cache | None) -> int | None:
    """Tokens a static cache can hold (None: grows as needed)."""
    if not is_static(cache):
        return None
    return min((layer.max_cache_len for layer in cache.layers if hasattr(layer, "max_cache_len")), default=None)


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
