"""Shared machinery of the KV protocols: policies, caches, forwards through them, byte counts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from leanlm.errors import LeanLMError
from leanlm.evaluate.memory import cache_tensors
from leanlm.generate import next_positions
from leanlm.kvcache import CachePolicy, attach
from leanlm.models import arch_of
from leanlm.models.compat import with_cache
from leanlm.models.widen import widened_linears

PolicyArg = CachePolicy | Callable[[int], CachePolicy] | None
JOINS = ("raw", "paper")
SCORE_SLICE = 256  # positions per output-head slice: (256, vocab) float32 = 50 MB for SmolLM2


def resolve_policy(policy: PolicyArg, tokens: int) -> CachePolicy | None:
    """The policy to attach for a text of ``tokens`` tokens (a factory is called with it)."""
    if policy is None or isinstance(policy, CachePolicy):
        return policy
    if callable(policy):
        built = policy(tokens)
        if built is not None and not isinstance(built, CachePolicy):
            raise LeanLMError(f"a policy factory must return a CachePolicy, got {type(built).__name__}")
        return built
    raise LeanLMError(f"policy must be None, a CachePolicy or a factory tokens -> CachePolicy, got {type(policy).__name__}")


def describe_policy(policy: CachePolicy | None) -> dict:
    return {"policy": "none", "cache": "DynamicCache"} if policy is None else policy.describe()


@contextmanager
def open_cache(model, policy: CachePolicy | None) -> Iterator[Cache]:
    """A fresh cache: a plain DynamicCache for ``None``, else the policy's (hooks removed on exit)."""
    if policy is None:
        yield DynamicCache(config=model.config)  # the model's own layout (Gemma 3: sliding layers hold their window)
    else:
        with attach(model, policy) as cache:
            yield cache


def cache_nbytes(cache: Cache) -> int:
    """Resident bytes the cache holds now."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


def cache_total_nbytes(cache: Cache) -> int:
    """Fast + slow tier: every byte the cache holds (a two-tier cache's slow tier is CPU tensors or the page
    cache of its file, in RAM here); equal to ``cache_nbytes`` for a one-tier cache."""
    slow = sum(layer.slow_nbytes() for layer in getattr(cache, "layers", ()) if hasattr(layer, "slow_nbytes"))
    return cache_nbytes(cache) + slow


def cache_peak_nbytes(cache: Cache) -> int:
    """Peak bytes incl. transient dequantized copies (a DynamicCache only grows: its peak is now)."""
    return cache.peak_nbytes() if hasattr(cache, "peak_nbytes") else cache_nbytes(cache)


def cache_held_tokens(cache: Cache) -> int:
    return cache.held_tokens() if hasattr(cache, "held_tokens") else cache.get_seq_length()


def forward_hidden(model, cache: Cache, ids: torch.Tensor) -> torch.Tensor:
    """Feed ``ids`` (1-D) through the cache; the final post-norm hidden states, (len(ids), hidden)."""
    device = next(model.parameters()).device
    ids = ids.to(device).unsqueeze(0)  # (1, n)
    with widened_linears(model):  # a prefill: float32 GEMMs where the CPU has no bf16 ones
        out = arch_of(model).body(input_ids=ids, **with_cache(cache), use_cache=True,
                                  position_ids=next_positions(cache, ids.shape[1], device=device))
    return out.last_hidden_state[0]  # (n, hidden)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits from final hidden states (the CausalLM head, soft-capped where the family does), (n, vocab)."""
    with widened_linears(model):
        return arch_of(model).logits(hidden)


def dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
