"""Attention head pruning, GQA-aware, with physical removal (smaller Linears, smaller KV cache).

transformers lays GQA out as ``repeat_kv``: query head h reads KV head h // group, group = heads //
kv_heads, and every KV group must serve the same number of query heads. So a layer can lose either
whole KV groups (their query heads and their k/v rows: the KV cache shrinks) or the same number k of
query heads from every group (only q_proj rows and o_proj columns go). For MHA (group of one) both
are the same thing.

Scores come from ``leanlm.analyze`` (any object with ``per_head`` and ``per_kv_group`` lists,
higher = more important). A removal *step* of a layer is one more head per group (granularity
"query") or one more whole group ("kv_group"); steps are ranked by their mean head score.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from leanlm.analyze import SCORERS
from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, arch_of
from leanlm.models.arch import AttentionView
from leanlm.transforms.base import (
    Transform,
    check_choice,
    check_fraction,
    head_rows,
    register,
    keep_in_features,
    keep_out_features,
    scatter_in_features,
    scatter_out_features,
)
from leanlm.models.compact import KEPT_HEADS_KEY, sync_shape_config
from leanlm.settings import choices

log = logging.getLogger(__name__)

LAYOUTS = ("global", "uniform")
GRANULARITIES = ("query", "kv_group")


@dataclass(frozen=True)
class Step:
    """Removing one more head per KV group (or one more KV group) from one layer."""

    layer: int
    heads: tuple[int, ...]  # query heads this step removes
    score: float  # mean importance of those heads (lower goes first)


def layer_steps(per_head: list[float], per_kv_group: list[float], layer: int, granularity: str) -> list[Step]:
    """All removal steps of one layer, cheapest first. The last step would empty the layer."""
    num_heads, num_kv = len(per_head), len(per_kv_group)
    group = num_heads // num_kv
    if granularity == "kv_group" or group == 1:
        # Whole groups. With MHA a query head is its own group, ranked by its own score.
        group_scores = per_kv_group if granularity == "kv_group" else per_head
        order = sorted(range(num_kv), key=lambda g: (group_scores[g], g))
        return [Step(layer, tuple(range(g * group, (g + 1) * group)), group_scores[g]) for g in order]
    # The k-th step removes the k-th least important query head of every group.
    by_group = [sorted(range(g * group, (g + 1) * group), key=lambda h: (per_head[h], h)) for g in range(num_kv)]
    steps = []
    for k in range(group):
        heads = tuple(sorted(ranked[k] for ranked in by_group))
        steps.append(Step(layer, heads, sum(per_head[h] for h in heads) / len(heads)))
    return steps


def _check_scores(scores, spec: ModelSpec | None) -> None:
    per_head, per_kv = scores.per_head, scores.per_kv_group
    if len(per_head) != len(per_kv):
        raise LeanLMError("head scores list a different number of layers for query heads and KV groups")
    for layer, (heads, groups) in enumerate(zip(per_head, per_kv)):
        if not groups or len(heads) % len(groups):
            raise LeanLMError(f"head scores of layer {layer}: {len(heads)} query heads do not split into {len(groups)} KV groups")
    if spec is not None:
        shape = (tuple(map(len, per_head)), tuple(map(len, per_kv)))
        if shape != (spec.heads_per_layer, spec.kv_heads_per_layer):
            raise LeanLMError("the head scores were computed for a model with other head counts than this one")


def select_heads(
    scores, fraction: float, layout: str = "global", granularity: str = "query", spec: ModelSpec | None = None
) -> dict[int, list[int]]:
    """Choose the query heads to remove: ``{layer: [head, ...]}``, least important first.

    ``fraction`` of all query heads is reached as closely as the GQA steps allow; ``removed_fraction``
    tells the exact value. ``global`` ranks steps across layers; ``uniform`` takes the same share
    from every layer. ``spec`` (optional) checks the scores match the model's head counts.
    """
    check_fraction(fraction, "heads")
    check_choice(layout, LAYOUTS, "layout")
    check_choice(granularity, GRANULARITIES, "granularity")
    _check_scores(scores, spec)
    steps = [
        layer_steps(heads, groups, layer, granularity)
        for layer, (heads, groups) in enumerate(zip(scores.per_head, scores.per_kv_group))
    ]
    chosen = _uniform(steps, fraction) if layout == "uniform" else _global(steps, fraction, scores.per_head)
    remove: dict[int, list[int]] = {}
    for step in chosen:
        remove.setdefault(step.layer, []).extend(step.heads)
    return {layer: sorted(heads) for layer, heads in sorted(remove.items())}


def _uniform(steps: list[list[Step]], fraction: float) -> list[Step]:
    chosen = []
    for layer, options in enumerate(steps):
        num_heads = sum(len(s.heads) for s in options)
        removed = [0]
        for step in options:
            removed.append(removed[-1] + len(step.heads))
        # The step count whose removed heads come closest to the fraction (ties: fewer).
        k = min(range(len(removed)), key=lambda i: (abs(removed[i] - fraction * num_heads), i))
        if k == len(options):
            raise LeanLMError(
                f"a fraction of {fraction} means pruning every head of layer {layer}; use a smaller fraction"
            )
        chosen.extend(options[:k])
    return chosen


def _global(steps: list[list[Step]], fraction: float, per_head: list[list[float]]) -> list[Step]:
    target = fraction * sum(map(len, per_head))
    # Never a layer's last step (it would empty the layer). Within a layer step scores never
    # decrease, so this order also takes a layer's steps in their own order.
    pool = sorted(
        ((step.score, step.layer, k, step) for options in steps for k, step in enumerate(options[:-1])),
        key=lambda item: item[:3],
    )
    chosen, removed, blocked = [], 0, set()
    for _, layer, _, step in pool:
        if layer in blocked:
            continue
        if abs(removed + len(step.heads) - target) < abs(removed - target):
            chosen.append(step)
            removed += len(step.heads)
        else:
            blocked.add(layer)  # a later step of this layer must not skip this one
    # Every allowed step taken and still short: only emptying a layer would come closer.
    if not blocked:
        for step in sorted((options[-1] for options in steps), key=lambda s: (s.score, s.layer)):
            if abs(removed + len(step.heads) - target) < abs(removed - target):
                raise LeanLMError(
                    f"a fraction of {fraction} means pruning every head of layer {step.layer} "
                    f"(at most {removed} of {sum(map(len, per_head))} heads can go); use a smaller fraction"
                )
    return chosen


def removed_fraction(remove: dict[int, list[int]], spec: ModelSpec) -> float:
    """The exact share of all query heads that ``remove`` takes away."""
    return sum(len(set(heads)) for heads in remove.values()) / spec.total_heads


def _check_remove(remove: dict[int, list[int]], spec: ModelSpec) -> None:
    for layer, heads in remove.items():
        if not 0 <= layer < spec.num_layers:
            raise LeanLMError(f"cannot prune heads of layer {layer}: the model has {spec.num_layers} layers")
        bad = [h for h in heads if not 0 <= h < spec.heads_per_layer[layer]]
        if bad:
            raise LeanLMError(f"layer {layer} has {spec.heads_per_layer[layer]} query heads, so head {bad[0]} does not exist")


def _plan_layer(num_heads: int, num_kv: int, remove: set[int], layer: int) -> tuple[list[int], list[int]]:
    """The query heads and KV groups a layer keeps, or a LeanLMError if GQA cannot represent that."""
    group = num_heads // num_kv
    keep = [h for h in range(num_heads) if h not in remove]
    if not keep:
        raise LeanLMError(f"pruning every head of layer {layer} would cut the model in two; keep at least one")
    kept_per_group = Counter(h // group for h in keep)  # KV group -> query heads it keeps
    if len(set(kept_per_group.values())) > 1:
        raise LeanLMError(
            f"layer {layer} would keep {sorted(kept_per_group.values())} query heads in its KV groups; "
            "transformers needs the same number in every group"
        )
    return keep, sorted(kept_per_group)


def _prune_attention(attn: AttentionView, keep: list[int], keep_kv: list[int], head_dim: int) -> None:
    """Slice one attention module in place to the kept query heads and KV groups.

    Biases (Qwen2) go with their rows; q/k norms (Gemma 3) act per head over head_dim, so they stay.
    """
    num_kv = attn.num_kv_heads
    keep_out_features(attn.q_proj, head_rows(keep, head_dim))
    keep_in_features(attn.o_proj, head_rows(keep, head_dim))
    if len(keep_kv) < num_kv:  # whole groups went: their keys and values go too (smaller cache)
        keep_out_features(attn.k_proj, head_rows(keep_kv, head_dim))
        keep_out_features(attn.v_proj, head_rows(keep_kv, head_dim))
    # The modules reshape with -1 heads; repeat_kv and sdpa read the per-module group size.
    attn.set_group_size()


def prune_heads(model: nn.Module, remove: dict[int, list[int]]) -> nn.Module:
    """Physically remove query heads (and KV groups left empty) in place; update the config."""
    spec = ModelSpec.from_model(model)
    _check_remove(remove, spec)
    config = model.config
    positions = head_positions(model)
    # Plan every layer before touching any, so a refused removal leaves the model whole.
    plans = {
        layer: _plan_layer(spec.heads_per_layer[layer], spec.kv_heads_per_layer[layer], set(heads), layer)
        for layer, heads in sorted(remove.items())
        if heads
    }
    for layer, (keep, keep_kv) in plans.items():
        _prune_attention(arch_of(model).attention(layer), keep, keep_kv, spec.head_dim)
        positions[layer] = [positions[layer][h] for h in keep]
    setattr(config, KEPT_HEADS_KEY, positions)
    sync_shape_config(model)  # drops the positions again if the result is a stock config
    return model


def head_positions(model: nn.Module) -> list[list[int]]:
    """For each layer, where its query heads sit among the stock ``num_attention_heads``.

    Pruning records this (``leanlm_kept_heads``); without a record, the heads of the i-th KV group
    sit at the start of the i-th stock group (a valid layout: heads are order-free within a group).
    """
    config, spec = model.config, ModelSpec.from_model(model)
    recorded = getattr(config, KEPT_HEADS_KEY, None)
    if recorded is not None and list(map(len, recorded)) == list(spec.heads_per_layer):
        return [list(p) for p in recorded]
    stock_group = config.num_attention_heads // config.num_key_value_heads
    positions = []
    for heads, kv in zip(spec.heads_per_layer, spec.kv_heads_per_layer):
        group = heads // kv
        positions.append([(h // group) * stock_group + h % group for h in range(heads)])
    return positions


@contextlib.contextmanager
def mask_heads(model: nn.Module, remove: dict[int, list[int]]):
    """Reference for tests: zero the o_proj columns of the given heads, restore them on exit."""
    head_dim = ModelSpec.from_model(model).head_dim
    saved = {}
    try:
        with torch.no_grad():
            for layer, heads in remove.items():
                o_proj = arch_of(model).attention(layer).o_proj
                saved[layer] = o_proj.weight.detach().clone()
                o_proj.weight[:, head_rows(heads, head_dim)] = 0
        yield model
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                arch_of(model).attention(layer).o_proj.weight.copy_(weight)


def pad_heads(model: nn.Module) -> nn.Module:
    """A copy with every layer back at the stock head counts, removed heads re-inserted as zeros.

    Zero q rows and zero o_proj columns (and zero k/v rows for a removed KV group) contribute
    nothing, so logits are the same (exactly in float64; in float32 the longer o_proj sums round
    differently: 8e-4 on SmolLM2-135M logits of size 30) and stock ``from_pretrained`` loads the copy. Memory and
    speed are those of the unpruned model: this is for compatibility, not for serving.
    """
    padded = copy.deepcopy(model)
    config, spec = padded.config, ModelSpec.from_model(padded)
    stock_heads, stock_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, spec.head_dim
    stock_group = stock_heads // stock_kv
    for layer, positions in enumerate(head_positions(padded)):
        attn = arch_of(padded).attention(layer)
        kv_positions = sorted({p // stock_group for p in positions})  # stock KV group of each kept group
        if len(positions) == stock_heads:
            continue
        scatter_out_features(attn.q_proj, head_rows(positions, head_dim), stock_heads * head_dim)
        scatter_in_features(attn.o_proj, head_rows(positions, head_dim), stock_heads * head_dim)
        if len(kv_positions) < stock_kv:
            scatter_out_features(attn.k_proj, head_rows(kv_positions, head_dim), stock_kv * head_dim)
            scatter_out_features(attn.v_proj, head_rows(kv_positions, head_dim), stock_kv * head_dim)
        attn.set_group_size()
    sync_shape_config(padded)
    return padded


@register
@dataclass
class PruneHeads(Transform):
    """Remove the least important attention heads (needs ``scores`` from ``leanlm.analyze``)."""

    name: ClassVar[str] = "prune_heads"
    needs: ClassVar[tuple[str, ...]] = ("scores",)
    identity_settings: ClassVar[dict] = {"fraction": 0.0}
    fraction: float = field(default=0.25, metadata={"help": "share of all query heads to remove, in [0, 1)"})
    layout: str = field(default="global", metadata=choices(LAYOUTS, "global: rank steps across layers; "
                                                                    "uniform: the same share in every layer"))
    granularity: str = field(default="query", metadata=choices(GRANULARITIES, "query: k heads per KV group; "
                                                                              "kv_group: whole groups (smaller KV cache)"))
    scorer: str = field(default="kl", metadata=choices(tuple(SCORERS), "head importance measure the pipeline runs "
                                                                      "on the model as it is when this step starts"))

    def __post_init__(self) -> None:
        check_fraction(self.fraction, "heads")
        check_choice(self.layout, LAYOUTS, "layout")
        check_choice(self.granularity, GRANULARITIES, "granularity")
        check_choice(self.scorer, tuple(SCORERS), "scorer")

    def modify(self, model: nn.Module, scores=None, **context) -> dict:
        if scores is None:
            raise LeanLMError("prune_heads needs head scores: run the analyze step (a head scorer) first")
        spec = ModelSpec.from_model(model)
        remove = select_heads(scores, self.fraction, self.layout, self.granularity, spec)
        achieved = removed_fraction(remove, spec)
        log.info("removing %.4f of the query heads (asked for %.4f)", achieved, self.fraction)
        prune_heads(model, remove)
        after = ModelSpec.from_model(model)
        return {
            "heads": {str(layer): heads for layer, heads in remove.items()},
            "fraction_requested": self.fraction,
            "fraction_achieved": achieved,
            "heads_removed": spec.total_heads - after.total_heads,
            "kv_heads_removed": spec.total_kv_heads - after.total_kv_heads,
            "layout": self.layout,
            "granularity": self.granularity,
            "scorer": getattr(scores, "scorer", self.scorer),
        }
