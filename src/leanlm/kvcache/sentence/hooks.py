"""Hooks: token ids in (the base model), per-layer sentence selection and the resized mask (attention)."""

from __future__ import annotations

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import PolicyCache
from leanlm.kvcache.sentence.index import SemanticIndex
from leanlm.kvcache.sentence.segment import Segmenter


def fit_mask(mask: torch.Tensor | None, held: int, q_len: int, device=None) -> torch.Tensor | None:
    """The step's causal mask re-sized to ``held`` attended tokens before the ``q_len`` new ones.

    ``mask``: (batch, 1, q, old_held + q), bool (sdpa: True = attend) or additive float (eager), or
    None (sdpa's implicit causal mask). Every held token is visible to every new query.
    """
    if mask is None:
        if q_len == 1 or held == 0:
            return None  # one query sees everything; or nothing held: sdpa's is_causal is right
        # bottom-right causal: query i sees the held tokens and new tokens 0..i
        visible = torch.ones(q_len, held + q_len, dtype=torch.bool, device=device).tril(diagonal=held)
        return visible[None, None]
    if mask.shape[-1] == held + q_len:
        return mask
    open_value = True if mask.dtype == torch.bool else 0.0
    if not (mask[..., :-q_len] == open_value).all():
        raise LeanLMError("sentence_tier needs unpadded inputs: every held token must be visible to every query")
    past = torch.full((*mask.shape[:-1], held), open_value, dtype=mask.dtype, device=mask.device)
    return torch.cat([past, mask[..., -q_len:]], dim=-1)


def step_cache(kwargs: dict):
    """The cache a forward was given: ``cache=`` since transformers 5.24, ``past_key_values=`` before."""
    return kwargs["cache"] if kwargs.get("cache") is not None else kwargs.get("past_key_values")


def feed_token_ids(module: nn.Module, args: tuple, kwargs: dict, cache: PolicyCache, segmenter: Segmenter,
                   index: SemanticIndex | None = None) -> None:
    """Forward pre-hook on the base model: segment the step's token ids (when this cache is used)."""
    if step_cache(kwargs) is not cache:
        return
    ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else (args[0] if args else None)
    if ids is not None:
        segmenter.observe(ids)
    if index is not None:
        if ids is None:
            raise LeanLMError("sentence_tier index='minilm' reads the text: call the model with input_ids")
        index.observe(ids[0].tolist(), segmenter.step_ids, segmenter.closed)  # the batch shares one segmentation


def select_and_fit_mask(module: nn.Module, args: tuple, kwargs: dict, cache: PolicyCache):
    """Forward pre-hook on an attention module: retrieve this layer's sentences, resize the mask."""
    if step_cache(kwargs) is not cache:
        return None
    layer = cache.layers[module.layer_idx]
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (batch, q, hidden)
    if not layer.is_initialized:
        return None  # the first step: nothing held, nothing to retrieve
    layer.select(layer.queries)
    mask = fit_mask(kwargs.get("attention_mask"), layer.held_tokens(), hidden.shape[1], hidden.device)
    bias = layer.past_bias()
    if bias is not None:
        mask = add_past_bias(mask, bias, module.config.num_attention_heads, hidden.shape[1], hidden.dtype)
    kwargs["attention_mask"] = mask
    return args, kwargs


def add_past_bias(mask: torch.Tensor | None, bias: torch.Tensor, heads: int, q_len: int, dtype) -> torch.Tensor:
    """An additive float mask (batch, heads, q, held + q): ``mask`` (bool/float/None) + ``bias`` on held tokens.

    ``bias``: (kv_heads, held), shared by the query heads of each KV group.
    """
    held = bias.shape[1]
    if mask is None:  # sdpa's implicit causal mask, made explicit
        mask = torch.ones(q_len, held + q_len, dtype=torch.bool, device=bias.device).tril(diagonal=held)[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    per_head = bias.repeat_interleave(heads // bias.shape[0], dim=0)  # (heads, held)
    past = mask[..., :held] + per_head[None, :, None].to(mask.dtype)
    return torch.cat([past, mask[..., held:].expand(*past.shape[:-1], -1)], dim=-1)
