"""``share_kv``: merge the KV heads of each group into fewer (MHA -> GQA -> MQA) after pretraining.

Each layer keeps ``kv_heads`` KV heads (a divisor of the heads it has; per layer or uniform), so the
KV cache shrinks by the same factor. Query heads and their order stay; each new KV head is the merge
of the consecutive old ones whose query heads it now serves (``merge.py``): ``mean`` (the GQA
baseline) or ``calibrated`` (a least-squares fit on calibration inputs, queries and output projection
absorbing what they can, RoPE-commuting). A uniform result is a stock checkpoint (fewer
``num_key_value_heads``); per-layer counts use the compact format. ``expand_to_mha`` gives the exactly
equivalent multi-head model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, arch_of
from leanlm.models.compact import sync_shape_config
from leanlm.settings import choices
from leanlm.transforms.base import Transform, check_calibration, register
from leanlm.transforms.share_kv.calibration import attention_input_moments
from leanlm.transforms.share_kv.expand import expand_to_mha
from leanlm.transforms.share_kv.merge import calibrated_merge, mean_merge

log = logging.getLogger(__name__)

METHODS = ("mean", "calibrated")


def kv_plan(spec: ModelSpec, kv_heads: int | list[int] | dict[int, int], layers: list[int] | None = None) -> dict[int, int]:
    """``{layer: new KV heads}`` for the layers that change; one LeanLMError for any impossible setting.

    ``kv_heads``: one count for every layer in ``layers`` (None: all), a list with one count per layer,
    or a ``{layer: count}`` dict. A count must divide the layer's current KV heads.
    """
    if isinstance(kv_heads, dict):
        wanted = dict(kv_heads)
    elif isinstance(kv_heads, (list, tuple)):
        if len(kv_heads) != spec.num_layers:
            raise LeanLMError(f"share_kv per_layer lists {len(kv_heads)} counts for a model of {spec.num_layers} layers")
        wanted = dict(enumerate(kv_heads))
    else:
        wanted = {layer: kv_heads for layer in (range(spec.num_layers) if layers is None else layers)}
    plan = {}
    for layer, count in sorted(wanted.items()):
        if not 0 <= layer < spec.num_layers:
            raise LeanLMError(f"share_kv: layer {layer} does not exist (the model has {spec.num_layers} layers)")
        have = spec.kv_heads_per_layer[layer]
        if not isinstance(count, int) or count < 1 or have % count:
            divisors = [k for k in range(1, have + 1) if have % k == 0]
            raise LeanLMError(f"share_kv: layer {layer} has {have} KV heads, so kv_heads must be one of "
                              f"{', '.join(map(str, divisors))} (got {count})")
        if count != have:
            plan[layer] = count
    return plan


def merge_kv_heads(model: nn.Module, kv_heads: int | list[int] | dict[int, int], method: str = "mean",
             calibration: list[torch.Tensor] | None = None, layers: list[int] | None = None,
             damping: float = 0.01) -> dict:
    """Merge KV heads in place (see the module doc); returns a JSON-able description of what changed."""
    if method not in METHODS:
        raise LeanLMError(f"unknown share_kv method '{method}': choose one of {', '.join(METHODS)}")
    spec = ModelSpec.from_model(model)
    plan = kv_plan(spec, kv_heads, layers)  # every layer checked before any is touched
    moments = {}
    if method == "calibrated" and plan:
        batches = check_calibration(calibration, "share_kv (method calibrated)")
        moments = attention_input_moments(model, batches, list(plan))
    keys = {}
    with torch.no_grad():
        for layer, count in plan.items():
            view = arch_of(model).attention(layer)
            if method == "mean":
                mean_merge(view, count)
                keys[layer] = "mean"
            else:
                keys[layer] = calibrated_merge(view, count, moments[layer], damping)
    sync_shape_config(model)
    after = ModelSpec.from_model(model)
    return {
        "method": method,
        "keys_merged_by": sorted(set(keys.values())),
        "kv_heads_before": list(spec.kv_heads_per_layer),
        "kv_heads_after": list(after.kv_heads_per_layer),
        "kv_bytes_fraction": after.total_kv_heads / spec.total_kv_heads,
        "layers_changed": list(plan),
    }


@register
@dataclass
class ShareKV(Transform):
    """Share KV heads between more query heads (fewer KV heads, a smaller KV cache)."""

    name: ClassVar[str] = "share_kv"
    needs: ClassVar[tuple[str, ...]] = ("calibration",)
    identity_settings: ClassVar[dict] = {"layers": []}
    kv_heads: int = field(default=1, metadata={"help": "KV heads each chosen layer keeps (a divisor of what it has; "
                                                       "1 = MQA)"})
    method: str = field(default="calibrated", metadata=choices(METHODS, "mean: average the merged heads (GQA); "
                                                                        "calibrated: least-squares fit on calibration "
                                                                        "inputs, q/o projections absorbing"))
    layers: list[int] | None = field(default=None, metadata={"help": "layers to merge (None = all)"})
    per_layer: list[int] | None = field(default=None, metadata={"help": "KV heads of every layer, one count per "
                                                                        "layer (overrides kv_heads and layers)"})
    damping: float = field(default=0.01, metadata={"help": "calibrated: ridge added to E[x x^T], as a share of "
                                                           "its mean diagonal"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LeanLMError(f"unknown share_kv method '{self.method}': choose one of {', '.join(METHODS)}")
        counts = [self.kv_heads] + list(self.per_layer or [])
        if any(count < 1 for count in counts):
            raise LeanLMError(f"share_kv kv_heads must be at least 1, got {min(counts)}")
        if self.damping < 0:
            raise LeanLMError(f"share_kv damping must not be negative, got {self.damping}")

    def modify(self, model: nn.Module, calibration=None, **context) -> dict:
        target = list(self.per_layer) if self.per_layer is not None else self.kv_heads
        return merge_kv_heads(model, target, self.method, calibration, self.layers, self.damping)


__all__ = ["METHODS", "ShareKV", "expand_to_mha", "kv_plan", "merge_kv_heads"]
