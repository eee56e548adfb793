"""Shared by the KV-cache tests: the tiny GQA model they run and a chunked feed through any cache."""

from __future__ import annotations

import torch

from leanlm.generate import next_positions
from leanlm.models import tiny_llama


def tiny_kv_model():
    """2 layers, 4 query heads sharing 2 KV heads, head_dim 32 (a multiple of the quantization groups)."""
    return tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128)


def run_chunks(model, ids: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Logits of ids fed ``chunk`` tokens at a time through ``cache``, with explicit positions."""
    logits = []
    with torch.no_grad():
        for part in ids.split(chunk, dim=1):
            positions = next_positions(cache, part.shape[1], part.shape[0])
            logits.append(model(part, past_key_values=cache, position_ids=positions, use_cache=True).logits)
    return torch.cat(logits, dim=1)
