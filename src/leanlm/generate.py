"""Token-by-token decoding: kept for its public names; the loop itself is ``leanlm.engine``.

``stream`` is the engine's decode loop (chunked prefill, then one token per step through any cache:
a DynamicCache, a static cache or a leanlm policy cache). ``next_positions`` gives the positions of
the next tokens under any cache (a policy decides; a plain cache continues the text).
"""

from __future__ import annotations

import torch

from leanlm.engine.decode import stream
from leanlm.engine.sampling import Sampler, SamplingConfig


def next_positions(cache, num_tokens: int, batch: int = 1, device=None) -> torch.Tensor:
    """(batch, num_tokens) positions of the next tokens: a policy cache decides; a plain cache continues the text."""
    if hasattr(cache, "next_position_ids"):
        return cache.next_position_ids(num_tokens, batch=batch, device=device)
    start = cache.get_seq_length()
    return torch.arange(start, start + num_tokens, device=device).expand(batch, -1)


__all__ = ["Sampler", "SamplingConfig", "next_positions", "stream"]
