"""The one place that knows a model family's layout: module names, projections, norms, RoPE, layer types.

Every transform, scorer and cache policy reads a model through ``arch_of(model)`` instead of
spelling ``model.model.layers[i].self_attn.q_proj`` itself, so a family with another layout is one
new ``Family`` here, not an edit in every room. Supported (transformers ``model_type``):

- ``llama`` (SmolLM2, the default): q/k/v/o without bias, one RoPE base, every layer full attention.
- ``qwen2`` (Qwen2.5): the same plus q/k/v biases (pruning slices them with the rows).
- ``gemma3_text`` (Gemma 3): per-head RMSNorm on queries and keys before RoPE (``q_norm``/``k_norm``,
  over head_dim, so head pruning keeps them as they are), interleaved sliding-window and global
  layers (``config.layer_types``), one RoPE base per layer type, embeddings scaled by sqrt(hidden)
  inside the embedding module, attention scale ``query_pre_attn_scalar ** -0.5``, optional final
  logit soft-capping.

The view is live: it reads the modules each time, so a pruned model reports its real shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, rotate_half

from leanlm.errors import LeanLMError

FULL, SLIDING = "full_attention", "sliding_attention"
# The module names of the three transformers families (a family with other names sets its own).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # gate, up, down


@dataclass(frozen=True)
class Family:
    """What differs between families (module names are shared by the three transformers families)."""

    name: str
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before RoPE
    attention: str = "self_attn"
    projections: tuple[str, str, str, str] = ATTENTION_PROJECTIONS
    norms: tuple[str, str] = ("q_norm", "k_norm")
    mlp: str = "mlp"
    mlp_projections: tuple[str, str, str] = MLP_PROJECTIONS


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "qwen2": Family("qwen2"),
    "gemma3_text": Family("gemma3", qk_norm=True),
}


def family_of(config) -> Family:
    """The family of a transformers config, or a LeanLMError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise LeanLMError(
            f"leanlm does not know the layout of model type '{model_type}': supported are "
            f"{', '.join(FAMILIES)} (add a Family in leanlm/models/arch.py)"
        )
    return FAMILIES[model_type]


class AttentionView:
    """One decoder layer's attention as leanlm sees it: projections, norms, heads, RoPE, layer type."""

    def __init__(self, family: Family, config, module: nn.Module, index: int):
        self.family, self.config, self.module, self.index = family, config, module, index

    def _linear(self, which: int) -> nn.Linear:
        name = self.family.projections[which]
        if self.is_latent and not hasattr(self.module, name):
            raise LeanLMError(f"layer {self.index} caches a joint K/V latent (latent_kv): it has no {name}")
        return getattr(self.module, name)

    @property
    def is_latent(self) -> bool:
        """True for a ``LatentAttention`` (transforms/latent_kv): keys and values come from a cached latent."""
        return hasattr(self.module, "latent_rank")

    @property
    def q_proj(self) -> nn.Linear:
        return self._linear(0)

    @property
    def k_proj(self) -> nn.Linear:
        return self._linear(1)

    @property
    def v_proj(self) -> nn.Linear:
        return self._linear(2)

    @property
    def o_proj(self) -> nn.Linear:
        return self._linear(3)

    @property
    def q_norm(self) -> nn.Module | None:
        return getattr(self.module, self.family.norms[0]) if self.family.qk_norm else None

    @property
    def k_norm(self) -> nn.Module | None:
        return getattr(self.module, self.family.norms[1]) if self.family.qk_norm else None

    @property
    def head_dim(self) -> int:
        return head_dim_of(self.config)

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        if self.is_latent:
            return self.module.num_kv_heads
        return self.k_proj.out_features // self.head_dim

    @property
    def layer_type(self) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[self.index] if types else FULL

    @property
    def sliding_window(self) -> int | None:
        """Keys visible to a query in a sliding layer (itself included), else None (sees everything)."""
        return getattr(self.config, "sliding_window", None) if self.layer_type == SLIDING else None

    @property
    def scaling(self) -> float:
        """The factor on q·k before softmax (1/sqrt(head_dim), or Gemma's query_pre_attn_scalar)."""
        return float(getattr(self.module, "scaling", self.head_dim**-0.5))

    def set_index(self, index: int) -> None:
        """Renumber after layers were removed (the KV cache is indexed by ``layer_idx``)."""
        self.index = index
        self.module.layer_idx = index

    def set_group_size(self) -> None:
        """After pruning: tell the module how many query heads share each KV head (repeat_kv reads it)."""
        self.module.num_key_value_groups = self.num_heads // self.num_kv_heads

    def _heads(self, linear: nn.Linear, norm: nn.Module | None, hidden: torch.Tensor) -> torch.Tensor:
        states = linear(hidden).view(*hidden.shape[:-1], -1, self.head_dim)  # (batch, seq, heads, head_dim)
        if norm is not None:
            states = norm(states)
        return states.transpose(1, 2)  # (batch, heads, seq, head_dim)

    def rotated_queries(self, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Post-norm, post-RoPE queries (batch, heads, seq, head_dim), as the module computes them."""
        queries = self._heads(self.q_proj, self.q_norm, hidden)
        cos, sin = position_embeddings
        queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)
        return queries

    def scoring_queries(self, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Rotated queries scaled so that ``q·k / sqrt(head_dim)`` is the model's attention logit.

        Policies and scorers divide by sqrt(head_dim); Gemma 3 scales by query_pre_attn_scalar instead.
        """
        queries = self.rotated_queries(hidden, position_embeddings)  # (batch, heads, seq, head_dim)
        factor = self.scaling * self.head_dim**0.5
        return queries if math.isclose(factor, 1.0) else queries * factor

    def rotated_keys_values(self, hidden: torch.Tensor, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values (batch, kv_heads, seq, head_dim): what the module puts in a cache."""
        keys = self._heads(self.k_proj, self.k_norm, hidden)
        values = self._heads(self.v_proj, None, hidden)
        cos, sin = position_embeddings
        keys, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
        return keys, values


class MLPView:
    """One decoder layer's gated MLP: channel j is row j of gate and up, column j of down."""

    def __init__(self, family: Family, module: nn.Module):
        self.family, self.module = family, module

    @property
    def gate_proj(self) -> nn.Linear:
        return getattr(self.module, self.family.mlp_projections[0])

    @property
    def up_proj(self) -> nn.Linear:
        return getattr(self.module, self.family.mlp_projections[1])

    @property
    def down_proj(self) -> nn.Linear:
        return getattr(self.module, self.family.mlp_projections[2])

    @property
    def width(self) -> int:
        return self.down_proj.in_features


class ModelArch:
    """A causal LM of a known family: its decoder layers and their attention / MLP views."""

    def __init__(self, model: nn.Module):
        self.model, self.config = model, model.config
        self.family = family_of(model.config)

    @property
    def body(self) -> nn.Module:
        """The decoder stack (embeddings, layers, final norm, rotary tables): ``model.model``."""
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.body.layers

    def attention(self, index: int) -> AttentionView:
        module = getattr(self.layers[index], self.family.attention)
        return AttentionView(self.family, self.config, module, index)

    def attentions(self) -> list[AttentionView]:
        return [self.attention(i) for i in range(len(self.layers))]

    def mlp(self, index: int) -> MLPView:
        return MLPView(self.family, getattr(self.layers[index], self.family.mlp))

    def set_layers(self, keep: list[int]) -> None:
        """Keep only the decoder blocks at ``keep`` (in order) and renumber them; ``layer_types`` follows."""
        layers = self.layers
        self.body.layers = nn.ModuleList([layers[i] for i in keep])
        for new_index, layer in enumerate(self.body.layers):
            self.attention(new_index).set_index(new_index)
            if hasattr(layer, "layer_idx"):  # Gemma 3's decoder layer keeps its own copy
                layer.layer_idx = new_index
        if isinstance(getattr(self.config, "layer_types", None), list):
            self.config.layer_types = [self.config.layer_types[i] for i in keep]

    def layer_types(self) -> list[str]:
        return [view.layer_type for view in self.attentions()]

    def inv_freq(self, index: int) -> torch.Tensor:
        """The RoPE inverse frequencies layer ``index`` rotates with (head_dim / 2,)."""
        rotary = self.body.rotary_emb
        per_type = getattr(rotary, f"{self.attention(index).layer_type}_inv_freq", None)  # Gemma 3: one per type
        return per_type if per_type is not None else rotary.inv_freq

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.body.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from final-norm hidden states, as the CausalLM head computes them (soft-capping too)."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def attention_projection_names(self) -> tuple[str, ...]:
        return self.family.projections

    def mlp_projection_names(self) -> tuple[str, ...]:
        return self.family.mlp_projections


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def arch_of(model: nn.Module) -> ModelArch:
    """The layout view of ``model`` (a LeanLMError for a family leanlm does not know)."""
    return ModelArch(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM of a known family."""
    return arch_of(model).layers


__all__ = ["ATTENTION_PROJECTIONS", "rotate_half", "FAMILIES", "MLP_PROJECTIONS", "FULL", "SLIDING", "AttentionView", "Family", "MLPView", "ModelArch", "arch_of",
           "decoder_layers", "family_of", "head_dim_of"]
