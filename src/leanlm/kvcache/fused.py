"""Routing a model's attention to cache layers that attend over their own compressed storage.

A transformers attention module calls ``cache.update(k, v)`` and then the attention function named
by ``config._attn_implementation`` with whatever ``update`` returned. A ``FusedLayer`` returns only
the step's new K/V from ``update`` and marks itself ``pending``; ``compressed_attention`` (registered
with transformers' ``AttentionInterface`` as ``"leanlm_kv"``, its masks built as for ``sdpa``) then
asks the layer to attend over its held codes plus the new tokens (``FusedLayer.attend``). Layers
that are not pending — any other cache, or a step the layer chose to run the plain way — go to
transformers' ``sdpa`` function unchanged.

``install(model, cache)`` (a policy returns it from ``CachePolicy.hooks``, so ``attach`` undoes it on
exit) points every attention module at its cache layer and switches the implementation name; its
``remove`` restores both.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from leanlm.errors import LeanLMError
from leanlm.models.arch import decoder_layers
from leanlm.models.widen import WIDE_ATTENTION

ATTENTION_NAME = "leanlm_kv"
LAYER_ATTRIBUTE = "leanlm_kv_layer"


class FusedLayer:
    """Mixin for policy layers that attend over their own storage (see the module doc).

    ``fused`` is set while ``install`` is in effect; ``pending`` from ``update`` to ``attend``.
    """

    fused: bool = False
    pending: bool = False

    def attend(self, module: nn.Module, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """``module``: the attention module calling; query (batch, heads, q, head_dim) → attention output (batch, heads, q, head_dim); clears ``pending``."""
        raise NotImplementedError


def compressed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs):
    """transformers attention-function signature; returns ((batch, q, heads, head_dim), None)."""
    layer = getattr(module, LAYER_ATTRIBUTE, None)
    if layer is not None and layer.pending:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return layer.attend(module, query, attention_mask, scale).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, compressed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


class Installed:
    """What ``install`` changed, with ``remove`` (a hook-handle look-alike, so ``attach`` can undo it)."""

    def __init__(self, model: nn.Module, modules: list[nn.Module], layers: list, previous: str | None):
        self.model, self.modules, self.layers, self.previous = model, modules, layers, previous

    def remove(self) -> None:
        for module, layer in zip(self.modules, self.layers):
            if getattr(module, LAYER_ATTRIBUTE, None) is layer:
                delattr(module, LAYER_ATTRIBUTE)
            layer.fused = layer.pending = False
        self.model.config._attn_implementation = self.previous


def install(model: nn.Module, cache) -> Installed:
    """Point each attention module at its layer of ``cache`` and route attention through ``compressed_attention``."""
    previous = model.config._attn_implementation
    if previous not in ("sdpa", "eager", ATTENTION_NAME, WIDE_ATTENTION, None):  # restored to it by remove()
        raise LeanLMError(f"compressed KV attention replaces sdpa/eager attention, not '{previous}'")
    # layers that are not FusedLayer (e.g. a sliding-window layer keeping the model's own window) attend as sdpa
    pairs = [(block.self_attn, layer) for block, layer in zip(decoder_layers(model), cache.layers)
             if isinstance(layer, FusedLayer)]
    for module, layer in pairs:
        setattr(module, LAYER_ATTRIBUTE, layer)
        layer.fused = True
    model.config._attn_implementation = ATTENTION_NAME
    return Installed(model, [module for module, _ in pairs], [layer for _, layer in pairs], previous)


def causal_bias(q_len: int, total: int, mask: torch.Tensor | None, group: int, device) -> torch.Tensor | None:
    """Additive float32 bias (batch or 1, 1, group * q_len, total) for logits laid out (…, group * q, total).

    ``mask``: transformers' bool mask (batch, 1, q, total), True = attend, or None (then the last
    ``q_len`` columns are causal among the step's queries and every earlier column is visible).
    """
    if mask is None:
        if q_len == 1:
            return None
        keys = torch.arange(total, device=device)
        queries = total - q_len + torch.arange(q_len, device=device)
        mask = (keys[None, :] <= queries[:, None])[None, None]  # (1, 1, q, total)
    if mask.dtype != torch.bool:
        return mask.float().repeat(1, 1, group, 1)  # already additive
    bias = torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    return bias.repeat(1, 1, group, 1)  # (batch, 1, group * q, total): row g * q + i is query i of head g
