"""Token-by-token decoding through any cache (a policy cache or a plain DynamicCache).

Written out instead of calling ``model.generate`` because eviction policies in cache-position mode
(StreamingLLM) need ``position_ids`` that ``generate`` cannot know, and because a long run must keep
nothing but the cache: no growing ``input_ids``, no stored logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from leanlm.errors import LeanLMError
from leanlm.models.compat import with_cache


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 50
    seed: int = 0

    def validate(self) -> None:
        if self.temperature < 0 or self.top_k < 1:
            raise LeanLMError(f"temperature must be >= 0 and top_k >= 1, got {self.temperature}, {self.top_k}")


def next_positions(cache, num_tokens: int, batch: int = 1, device=None) -> torch.Tensor:
    """(batch, num_tokens) positions of the next tokens: a policy cache decides; a plain cache continues the text."""
    if hasattr(cache, "next_position_ids"):
        return cache.next_position_ids(num_tokens, batch=batch, device=device)
    start = cache.get_seq_length()
    return torch.arange(start, start + num_tokens, device=device).expand(batch, -1)


def pick(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """(batch, vocab) logits → (batch, 1) next token ids."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    top = logits.float().topk(min(sampling.top_k, logits.shape[-1]), dim=-1)
    probs = (top.values / sampling.temperature).softmax(dim=-1)
    return top.indices.gather(-1, torch.multinomial(probs, 1, generator=generator))


def stream(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, cache=None,
           sampling: SamplingConfig | None = None, prefill_chunk: int = 512) -> Iterator[torch.Tensor]:
    """Yield (batch,) token ids one step at a time; the prompt is prefilled in chunks through ``cache``."""
    sampling = sampling or SamplingConfig()
    sampling.validate()
    cache = DynamicCache(config=model.config) if cache is None else cache
    generator = torch.Generator().manual_seed(sampling.seed)
    batch = prompt_ids.shape[0]
    with torch.inference_mode():
        for part in prompt_ids.split(prefill_chunk, dim=1):
            logits = model(part, **with_cache(cache), position_ids=next_positions(cache, part.shape[1], batch),
                           use_cache=True, logits_to_keep=1).logits[:, -1]
        for _ in range(max_new_tokens):
            token = pick(logits, sampling, generator)  # (batch, 1)
            yield token[:, 0]
            logits = model(token, **with_cache(cache), position_ids=next_positions(cache, 1, batch),
                           use_cache=True).logits[:, -1]
