"""Tiny random models of each supported family, built in code, for fast tests (no download, no file)."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class TinyShape:
    """The shape every tiny family shares. ``num_kv_heads=None`` gives MHA; fewer KV heads give GQA/MQA."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int = 16
    intermediate_size: int = 128
    vocab_size: int = 256
    seed: int = 0
    tie_word_embeddings: bool = False

    def config_kwargs(self) -> dict:
        return dict(
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads or self.num_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=4096,
            tie_word_embeddings=self.tie_word_embeddings,
            # Larger init than the default 0.02 so heads matter and tests see real differences.
            initializer_range=0.2,
        )


def _randomise(model, names: tuple[str, ...]) -> None:
    """Draw the attention tensors transformers starts at zero (biases, norm weights): a zero would hide bugs."""
    with torch.no_grad():
        for view in arch_of(model).attentions():
            for name in names:
                view.module.get_parameter(name).normal_(0.0, 0.5)


def tiny_llama(**shape) -> LlamaForCausalLM:
    """A random Llama in eval mode (``TinyShape`` fields as keywords)."""
    tiny = TinyShape(**shape)
    torch.manual_seed(tiny.seed)
    return LlamaForCausalLM(LlamaConfig(**tiny.config_kwargs())).eval()


def tiny_qwen2(**shape) -> Qwen2ForCausalLM:
    """A random Qwen2 in eval mode: q/k/v biases, made non-zero so pruning must slice them right."""
    tiny = TinyShape(**shape)
    torch.manual_seed(tiny.seed)
    model = Qwen2ForCausalLM(Qwen2Config(**tiny.config_kwargs())).eval()
    _randomise(model, ("q_proj.bias", "k_proj.bias", "v_proj.bias"))
    return model


def tiny_gemma3(sliding_window: int = 8, pattern: int = 2, **shape) -> Gemma3ForCausalLM:
    """A random Gemma 3: q/k norms, every ``pattern``-th layer global and the others sliding over
    ``sliding_window`` tokens, local/global RoPE bases 10k / 1M, scaled embeddings; 3 layers by default.

    The norm weights are randomised (transformers starts them at zero, i.e. scale 1) so a test sees
    whether the q/k norms are applied.
    """
    tiny = TinyShape(**{"num_layers": 3, **shape})
    config = Gemma3TextConfig(
        **tiny.config_kwargs(),
        query_pre_attn_scalar=tiny.head_dim * 2,  # not head_dim, so a test sees whether the module's scaling is used
        sliding_window=sliding_window,
        layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(tiny.num_layers)],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(tiny.seed)
    model = Gemma3ForCausalLM(config).eval()
    _randomise(model, ("q_norm.weight", "k_norm.weight"))
    return model


TINY_FAMILIES = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3}


def tiny_model(family: str = "llama", **shape) -> torch.nn.Module:
    """A tiny random model of ``family`` (one of ``TINY_FAMILIES``)."""
    return TINY_FAMILIES[family](**shape)
