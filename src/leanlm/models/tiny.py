"""Tiny random Llama models built in code, for fast tests (no download, no file)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A random Llama in eval mode. ``num_kv_heads=None`` gives MHA; fewer KV heads give GQA/MQA."""
    config = LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        # Larger init than the default 0.02 so heads matter and tests see real differences.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
