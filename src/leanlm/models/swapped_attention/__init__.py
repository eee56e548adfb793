"""Attention replacements a swapped layer runs (PostNAS), one file each; ``transforms.swap_attention`` applies them.

Importing this package registers every replacement in ``REPLACEMENTS``, so a saved swapped model can
be rebuilt by ``rebuild_swaps`` when it is loaded.
"""

from leanlm.models.swapped_attention.base import (REPLACEMENTS, SWAP_KEY, ReplacementSettings, SwappedAttention,
                                                  make_settings, rebuild_swaps, swap_layer, swapped_layers)
from leanlm.models.swapped_attention.linear import LinearAttention, LinearSettings
from leanlm.models.swapped_attention.sliding_window import SlidingWindowAttention

__all__ = ["REPLACEMENTS", "SWAP_KEY", "LinearAttention", "LinearSettings", "ReplacementSettings", "SlidingWindowAttention",
           "SwappedAttention", "make_settings", "rebuild_swaps", "swap_layer", "swapped_layers"]
