"""Structural transforms: one technique per file behind ``Transform``; ``TRANSFORMS`` maps names to classes."""

from leanlm.transforms.base import TRANSFORMS, Transform, TransformReport, register, transform_from_dict
from leanlm.models.compact import is_compact, load_compact, maybe_load_compact, save_compact, sync_shape_config
from leanlm.transforms.prune_heads import PruneHeads, mask_heads, pad_heads, prune_heads, removed_fraction, select_heads
from leanlm.transforms.prune_layers import PruneLayers, block_influence, prune_layers
from leanlm.transforms.latent_kv import LatentKV
from leanlm.transforms.swap_attention import SwapAttention
from leanlm.transforms.prune_mlp import PruneMLP, channel_scores, mask_channels, prune_mlp, select_channels
from leanlm.transforms.share_kv import ShareKV, expand_to_mha, merge_kv_heads

# TRANSFORMS (name -> class) is filled by the @register decorator of each technique imported above.

__all__ = [
    "TRANSFORMS",
    "LatentKV",
    "PruneHeads",
    "PruneLayers",
    "PruneMLP",
    "SwapAttention",
    "ShareKV",
    "Transform",
    "TransformReport",
    "block_influence",
    "channel_scores",
    "expand_to_mha",
    "is_compact",
    "load_compact",
    "mask_channels",
    "mask_heads",
    "maybe_load_compact",
    "pad_heads",
    "prune_heads",
    "prune_layers",
    "prune_mlp",
    "register",
    "removed_fraction",
    "save_compact",
    "select_channels",
    "select_heads",
    "merge_kv_heads",
    "sync_shape_config",
    "transform_from_dict",
]
