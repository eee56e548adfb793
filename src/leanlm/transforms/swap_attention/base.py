"""The shared part of every attention replacement: take over a layer's projections, record the swap.

A replacement is an ``nn.Module`` put in place of a decoder layer's attention module. It keeps the
original ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (and Gemma 3's ``q_norm``/``k_norm``) under the
same names, so state-dict keys, ``arch_of`` views, LoRA targets and the KD code see the layer as
before; a replacement adds its own parameters beside them. It ignores the model's shared attention
mask (it builds its own causal / windowed one) and keeps its state in its own cache layer
(``leanlm.kvcache.swapped``). Batches must be unpadded (as for every leanlm cache policy).

The swap is recorded in the config under ``leanlm_swap_attention`` ({layer index: {"kind": ...,
settings}}); ``rebuild_swaps`` (called by ``leanlm.models.compact.load_compact``) puts the
replacements back before the weights are loaded, so an exported swapped model reloads exactly.

Why not the stock config: transformers' Llama (5.24) builds one causal mask for every layer and
never reads ``layer_types`` / ``sliding_window`` (Gemma 3 does), and a per-layer window size or a
linear layer has no stock key at all, hence this documented leanlm extension.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models.arch import AttentionView, arch_of, family_of

from leanlm.models.compact import SWAP_KEY  # noqa: E402  (one name, defined where checkpoints are read)


@dataclass
class ReplacementSettings:
    """Settings of one replacement (subclasses add theirs); checked on construction."""

    sink: int = 4
    window: int = 512

    def __post_init__(self) -> None:
        if self.window < 1:
            raise LeanLMError(f"a sliding window needs window >= 1 token, got {self.window}")
        if self.sink < 0:
            raise LeanLMError(f"sink tokens must be >= 0, got {self.sink}")


class SwappedAttention(nn.Module):
    """Base of the replacements: the original projections + ``view`` (queries, keys, values as the model makes them)."""

    kind: ClassVar[str]
    trains: ClassVar[bool] = False  # True when the replacement adds parameters (fitted, then distilled)
    Settings: ClassVar[type[ReplacementSettings]] = ReplacementSettings

    def __init__(self, original: nn.Module, config, index: int, settings: ReplacementSettings):
        super().__init__()
        self.config, self.layer_idx, self.settings = config, index, settings
        family = family_of(config)
        for name in (*family.projections, *(family.norms if family.qk_norm else ())):
            setattr(self, name, getattr(original, name))
        self.family = family
        self.scaling = float(getattr(original, "scaling", AttentionView(family, config, original, index).scaling))
        self.head_dim = AttentionView(family, config, original, index).head_dim
        self.num_key_value_groups = getattr(original, "num_key_value_groups", 1)
        self.is_causal = True

    def view(self) -> AttentionView:
        return AttentionView(self.family, self.config, self, self.layer_idx)

    def describe(self) -> dict:
        return {"kind": self.kind, **asdict(self.settings)}

    def qkv(self, hidden: torch.Tensor, position_embeddings):
        """Post-RoPE queries (b, heads, q, d) and keys/values (b, kv_heads, q, d), exactly as the original computes them."""
        view = self.view()
        return view.rotated_queries(hidden, position_embeddings), *view.rotated_keys_values(hidden, position_embeddings)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        out = self.attend(hidden_states, position_embeddings, cache)  # (batch, q, heads * head_dim)
        return self.o_proj(out), None

    def attend(self, hidden: torch.Tensor, position_embeddings, cache) -> torch.Tensor:
        raise NotImplementedError

    def new_parameters(self) -> list[str]:
        """Names (relative to this module) of the parameters the replacement added (trainable in recovery)."""
        kept = {f"{name}.{p}" for name in (*self.family.projections, *self.family.norms) if hasattr(self, name)
                for p, _ in getattr(self, name).named_parameters()}
        return [name for name, _ in self.named_parameters() if name not in kept]


REPLACEMENTS: dict[str, type[SwappedAttention]] = {}


def register_replacement(cls: type[SwappedAttention]) -> type[SwappedAttention]:
    REPLACEMENTS[cls.kind] = cls
    return cls


def make_settings(kind: str, options: dict) -> ReplacementSettings:
    """The settings of replacement ``kind`` from a mapping; unknown kinds and keys are one LeanLMError."""
    if kind not in REPLACEMENTS:
        raise LeanLMError(f"unknown attention replacement '{kind}': choose one of {', '.join(REPLACEMENTS)}")
    cls = REPLACEMENTS[kind].Settings
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise LeanLMError(f"unknown setting(s) {', '.join(unknown)} for replacement '{kind}'; known: {', '.join(sorted(known))}")
    return cls(**options)


def swapped_layers(model: nn.Module) -> dict[int, SwappedAttention]:
    """Layer index -> replacement module, for every swapped layer of ``model``."""
    arch = arch_of(model)
    return {i: view.module for i, view in enumerate(arch.attentions()) if isinstance(view.module, SwappedAttention)}


def swap_layer(model: nn.Module, index: int, kind: str, settings: ReplacementSettings | dict | None = None) -> SwappedAttention:
    """Put replacement ``kind`` in place of layer ``index``'s attention (a swapped layer is swapped back from
    its original projections first); records it in the config. Returns the new module."""
    arch = arch_of(model)
    if not 0 <= index < len(arch.layers):
        raise LeanLMError(f"cannot swap layer {index}: the model has {len(arch.layers)} layers")
    if not isinstance(settings, ReplacementSettings):
        settings = make_settings(kind, settings or {})
    elif kind not in REPLACEMENTS:
        raise LeanLMError(f"unknown attention replacement '{kind}': choose one of {', '.join(REPLACEMENTS)}")
    layer = arch.layers[index]
    original = getattr(layer, arch.family.attention)
    module = REPLACEMENTS[kind](original, model.config, index, settings)
    weight = original.q_proj.weight if hasattr(original, "q_proj") else next(original.parameters())
    module.to(device=weight.device, dtype=weight.dtype)
    setattr(layer, arch.family.attention, module)
    record = dict(getattr(model.config, SWAP_KEY, None) or {})
    record[str(index)] = module.describe()
    setattr(model.config, SWAP_KEY, record)
    return module


def rebuild_swaps(model: nn.Module) -> nn.Module:
    """Re-create the replacements a config records (before loading a swapped checkpoint's weights)."""
    record = getattr(model.config, SWAP_KEY, None) or {}
    for index, item in sorted(record.items(), key=lambda kv: int(kv[0])):
        options = dict(item)
        kind = options.pop("kind", None)
        swap_layer(model, int(index), kind, options)
    return model


__all__ = ["REPLACEMENTS", "SWAP_KEY", "ReplacementSettings", "SwappedAttention", "make_settings", "rebuild_swaps",
           "register_replacement", "swap_layer", "swapped_layers"]
