"""Tiny random models of each supported family, built in code, for fast tests (no download, no file)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from leanlm.models.arch import arch_of


def _shape(num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size, tie) -> dict:
    return dict(
        num_hidden_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=tie,
        # Larger init than the default 0.02 so heads matter and tests see real differences.
        initializer_range=0.2,
    )


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
    config = LlamaConfig(**_shape(num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size,
                                  vocab_size, tie_word_embeddings))
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Qwen2ForCausalLM:
    """A random Qwen2 (q/k/v biases, made non-zero so pruning must slice them right) in eval mode."""
    config = Qwen2Config(**_shape(num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size,
                                  vocab_size, tie_word_embeddings))
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers initialises biases to zero; a zero bias would hide slicing bugs
        for view in arch_of(model).attentions():
            for proj in (view.q_proj, view.k_proj, view.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


def tiny_gemma3(
    num_layers: int = 3,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_dim: int = 16,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    sliding_window: int = 8,
    pattern: int = 2,
) -> Gemma3ForCausalLM:
    """A random Gemma 3: q/k norms, every ``pattern``-th layer global and the others sliding over
    ``sliding_window`` tokens, local/global RoPE bases 10k / 1M, scaled embeddings.

    The norm weights are randomised (transformers starts them at zero, i.e. scale 1) so a test sees
    whether the q/k norms are applied.
    """
    config = Gemma3TextConfig(
        **_shape(num_layers, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size,
                 tie_word_embeddings),
        query_pre_attn_scalar=head_dim * 2,  # not head_dim, so a test sees whether the module's scaling is used
        sliding_window=sliding_window,
        layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for view in arch_of(model).attentions():
            view.q_norm.weight.normal_(0.0, 0.5)
            view.k_norm.weight.normal_(0.0, 0.5)
    return model


TINY_FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


def tiny_model(family: str = "llama", **shape) -> torch.nn.Module:
    """A tiny random model of ``family`` (one of ``TINY_FAMILIES``)."""
    return TINY_FAMILIES[family](**shape)
