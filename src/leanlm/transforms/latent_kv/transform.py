"""``latent_kv``: replace each attention's K/V projections by an MLA-style joint latent with partial RoPE.

Per layer (see ``fit.py`` for the calibrated parts and ``leanlm.models.latent_attention`` for the
module that replaces the attention): r frequency pairs per KV head keep RoPE and are cached as they
are; the other key channels and all value channels are rebuilt from one latent of ``rank`` numbers
per token, the only other thing cached. Cache elements per token and layer: rank + kv_heads · 2r,
against 2 · kv_heads · head_dim for the original, so ``kv_fraction`` fixes rank + kv_heads · 2r
(uniformly, or summed over layers and split by singular-value energy with ``allocation="spectrum"``).

The converted model is saved and reloaded with ``save_compact`` / ``load_model`` (config key
``leanlm_latent_kv``: ranks and r; the chosen channels are the ``rope_index`` buffers in the weights).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models.arch import AttentionView, arch_of
from leanlm.models.latent_attention import LATENT_KEY, LatentAttention, check_latent_shape, nope_channels, rope_channels
from leanlm.settings import choices
from leanlm.transforms.base import Transform, check_calibration, check_choice, register
from leanlm.transforms.latent_kv.fit import (
    Factorization,
    allocate_ranks,
    choose_pairs,
    collect_stats,
    row_weights,
    stacked_rows,
    whitened_svd,
)

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "spectrum")
WEIGHTINGS = ("none", "qo")
PAIR_CRITERIA = ("attention", "norm")


@dataclass
class LayerPlan:
    """What one layer becomes: its RoPE pairs, the factorization of its stacked rows, their biases."""

    pairs: torch.Tensor  # (kv_heads, r)
    factorization: Factorization
    bias: torch.Tensor | None  # (m,) or None

    @property
    def max_rank(self) -> int:
        return self.factorization.s.numel()


def check_family(model: nn.Module) -> list[AttentionView]:
    arch = arch_of(model)
    if arch.family.qk_norm:
        raise LeanLMError(f"latent_kv does not support {arch.family.name}: its per-head key norm acts on whole "
                          "keys, so keys cannot be rebuilt from a linear latent")
    views = arch.attentions()
    if any(view.sliding_window for view in views) or any(hasattr(view.module, "latent_rank") for view in views):
        raise LeanLMError("latent_kv converts full-attention layers of a model not yet converted")
    return views


def plan_layers(model: nn.Module, calibration, rope_pairs: int, weighting: str, damping: float,
                pair_criterion: str = "attention") -> list[LayerPlan]:
    """Calibrate, choose each layer's RoPE pairs and factor its no-RoPE key and value rows."""
    views = check_family(model)
    stats = collect_stats(model, check_calibration(calibration, "latent_kv"))
    plans = []
    for view, layer_stats in zip(views, stats):
        pairs = choose_pairs(layer_stats, rope_pairs, pair_criterion)  # (kv_heads, r)
        nope = nope_channels(rope_channels(pairs, view.head_dim), view.head_dim)  # (kv_heads, head_dim - 2r)
        weight, bias = stacked_rows(view, nope)
        factor = whitened_svd(weight, layer_stats, row_weights(view, layer_stats, nope, weighting), damping)
        plans.append(LayerPlan(pairs, factor, bias))
    return plans


def budget_ranks(views: list[AttentionView], plans: list[LayerPlan], kv_fraction: float, rope_pairs: int,
                 allocation: str) -> list[int]:
    """Per-layer latent rank so that rank + kv_heads · 2r = kv_fraction × 2 · kv_heads · head_dim."""
    room = [math.floor(kv_fraction * 2 * v.num_kv_heads * v.head_dim) - v.num_kv_heads * 2 * rope_pairs for v in views]
    if min(room) < 1:
        raise LeanLMError(f"kv_fraction {kv_fraction} leaves no room for a latent after {rope_pairs} RoPE pairs per "
                          "KV head; raise kv_fraction or lower rope_pairs")
    maxima = [plan.max_rank for plan in plans]
    if allocation == "uniform":
        return [min(r, m) for r, m in zip(room, maxima)]
    return allocate_ranks([plan.factorization for plan in plans], sum(room), maxima)


@torch.no_grad()
def build_layer(view: AttentionView, plan: LayerPlan, rank: int) -> LatentAttention:
    """The latent module for one layer, sharing the original q_proj / o_proj."""
    kv, hd, r = view.num_kv_heads, view.head_dim, plan.pairs.shape[-1]
    module = LatentAttention(view.config, view.index, view.num_heads, kv, hd, rank, r, view.scaling,
                             qkv_bias=view.k_proj.bias is not None, o_bias=view.o_proj.bias is not None)
    weight = view.k_proj.weight
    module.to(device=weight.device, dtype=weight.dtype)  # before the copies: float64 factors stay float64
    module.set_rope_pairs(plan.pairs)
    module.q_proj, module.o_proj = view.q_proj, view.o_proj
    rope_rows = (torch.arange(kv)[:, None] * hd + module.rope_index).flatten()  # (kv_heads * 2r,)
    up, down = plan.factorization.factors(rank)  # (m, rank), (rank, hidden)
    split = kv * (hd - 2 * r)
    module.k_rope.weight.copy_(weight[rope_rows])
    module.kv_down.weight.copy_(down)
    module.k_up.weight.copy_(up[:split])
    module.v_up.weight.copy_(up[split:])
    if plan.bias is not None:
        module.k_rope.bias.copy_(view.k_proj.bias[rope_rows])
        module.k_up.bias.copy_(plan.bias[:split])
        module.v_up.bias.copy_(plan.bias[split:])
    return module


def convert(model: nn.Module, calibration, rope_pairs: int, ranks: list[int] | int | None = None,
            kv_fraction: float | None = None, allocation: str = "uniform", weighting: str = "none",
            damping: float = 1e-4, pair_criterion: str = "attention") -> dict:
    """Replace every attention of ``model`` by a ``LatentAttention`` in place; return what was done.

    ``ranks`` (one per layer, or one for all) wins over ``kv_fraction`` (see ``budget_ranks``).
    """
    views = check_family(model)
    head_dim = views[0].head_dim
    check_latent_shape(1, rope_pairs, head_dim)
    if ranks is None and kv_fraction is None:
        raise LeanLMError("latent_kv needs a rank or a kv_fraction")
    if isinstance(ranks, int):
        ranks = [ranks] * len(views)
    for rank in ranks or []:
        check_latent_shape(rank, rope_pairs, head_dim)
    plans = plan_layers(model, calibration, rope_pairs, weighting, damping, pair_criterion)
    ranks = ranks or budget_ranks(views, plans, kv_fraction, rope_pairs, allocation)
    for layer, (rank, plan) in enumerate(zip(ranks, plans)):
        if rank > plan.max_rank:
            raise LeanLMError(f"layer {layer}: a latent rank of {rank} exceeds the full rank {plan.max_rank} of its K/V rows")
    layers = arch_of(model).layers
    for view, plan, rank in zip(views, plans, ranks):
        setattr(layers[view.index], arch_of(model).family.attention, build_layer(view, plan, rank))
    setattr(model.config, LATENT_KEY, {"rank_per_layer": list(ranks), "rope_pairs": rope_pairs})
    original = sum(2 * v.num_kv_heads * v.head_dim for v in views)
    kept = sum(rank + 2 * v.num_kv_heads * rope_pairs for rank, v in zip(ranks, views))
    return {"rank_per_layer": list(ranks), "rope_pairs": rope_pairs,
            "rope_pairs_per_layer": [plan.pairs.tolist() for plan in plans],
            "kv_elements_per_token": kept, "kv_elements_per_token_original": original,
            "kv_fraction_achieved": kept / original}


@register
@dataclass
class LatentKV(Transform):
    """MLA-style joint K/V latent with partial RoPE (needs ``calibration`` windows)."""

    name: ClassVar[str] = "latent_kv"
    needs: ClassVar[tuple[str, ...]] = ("calibration",)
    identity_settings: ClassVar[dict] = {"kv_fraction": 1.0, "rope_pairs": -1}
    kv_fraction: float = field(default=0.25, metadata={"help": "cached K/V elements per token kept, as a share of "
                                                               "the original cache's, in (0, 1]"})
    rope_pairs: int = field(default=4, metadata={"help": "frequency pairs per KV head that keep RoPE (MHA2MLA: 4 "
                                                         "of 32); -1 = all of them"})
    rank: int | None = field(default=None, metadata={"help": "latent rank of every layer; None = from kv_fraction"})
    allocation: str = field(default="uniform", metadata=choices(ALLOCATIONS, "how kv_fraction's latent channels "
                                                                "split over layers"))
    weighting: str = field(default="none", metadata=choices(WEIGHTINGS, "none: plain joint SVD of the whitened K/V "
                                                            "rows; qo: weigh key rows by query RMS and value rows by "
                                                            "o_proj column norms first (measured worse on SmolLM2)"))
    pair_criterion: str = field(default="attention", metadata=choices(PAIR_CRITERIA, "which frequency pairs keep "
                                  "RoPE: largest attention-weighted score change without it, or MHA2MLA's q/k 2-norm"))
    damping: float = field(default=1e-4, metadata={"help": "ridge added to the input covariance, × its mean diagonal"})

    def __post_init__(self) -> None:
        if not 0 < self.kv_fraction <= 1:
            raise LeanLMError(f"kv_fraction must be in (0, 1], got {self.kv_fraction}")
        if self.rope_pairs < -1:
            raise LeanLMError(f"rope_pairs must be -1 (all) or a number of pairs >= 0, got {self.rope_pairs}")
        if self.rank is not None and self.rank < 1:
            raise LeanLMError(f"the latent rank must be at least 1, got {self.rank}")
        if self.damping < 0:
            raise LeanLMError(f"damping must not be negative, got {self.damping}")
        check_choice(self.allocation, ALLOCATIONS, "allocation")
        check_choice(self.weighting, WEIGHTINGS, "weighting")
        check_choice(self.pair_criterion, PAIR_CRITERIA, "pair_criterion")

    def modify(self, model: nn.Module, calibration=None, **context) -> dict:
        views = check_family(model)
        head_dim = views[0].head_dim
        pairs = head_dim // 2 if self.rope_pairs == -1 else self.rope_pairs
        if pairs == head_dim // 2 and self.rank is None and self.kv_fraction >= 1:
            # Every channel keeps RoPE and the cache may stay full: a latent would only re-encode V in a
            # basis of its own, saving nothing. Leave the model exactly as it is.
            return {"unchanged": "all pairs keep RoPE and kv_fraction is 1: nothing to compress"}
        return convert(model, calibration, pairs, self.rank, self.kv_fraction, self.allocation, self.weighting,
                       self.damping, self.pair_criterion)
