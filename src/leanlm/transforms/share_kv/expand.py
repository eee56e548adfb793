"""The exactly equivalent multi-head model of a GQA/MQA model: every KV head repeated for its queries.

``repeat_kv`` does this at run time; doing it in the weights gives a true MHA model with the same
logits (useful to study KV sharing on a multi-head model: SmolLM2's 3 KV heads become 9, and
``share_kv`` with mean merging takes them back to 3 exactly).
"""

from __future__ import annotations

import copy

from torch import nn

from leanlm.models import arch_of
from leanlm.models.compact import sync_shape_config
from leanlm.transforms.share_kv.calibration import augmented_weight, has_bias, set_augmented_weight


def expand_to_mha(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with as many KV heads as query heads in every layer (same logits)."""
    expanded = copy.deepcopy(model)
    for view in arch_of(expanded).attentions():
        heads, num_kv, d, augmented = view.num_heads, view.num_kv_heads, view.head_dim, has_bias(view)
        if heads == num_kv:
            continue
        for proj in (view.k_proj, view.v_proj):
            weight = augmented_weight(proj, augmented).view(num_kv, d, -1)  # (kv, d, D)
            repeated = weight.repeat_interleave(heads // num_kv, dim=0).reshape(heads * d, -1)  # (heads * d, D)
            set_augmented_weight(proj, repeated, augmented)
        view.set_group_size()
    sync_shape_config(expanded)
    return expanded
