"""Swap attention layers for bounded ones after pretraining (PostNAS): one file per replacement.

- ``sliding_window``: the original attention over ``sink`` first + ``window`` last tokens.
- ``linear``: gated linear attention + a small window branch, initialised from the layer's weights.

``SwapAttention`` is the recipe transform (``{name: swap_attention, replacement: linear, layers: [...]}``);
``leanlm.analyze.swap_search`` finds which layers to swap and writes such a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models import arch_of
from leanlm.transforms.base import Transform, register
from leanlm.transforms.swap_attention.base import (REPLACEMENTS, SWAP_KEY, ReplacementSettings, SwappedAttention,
                                                   make_settings, rebuild_swaps, swap_layer, swapped_layers)
from leanlm.transforms.swap_attention.linear import LinearAttention, LinearSettings
from leanlm.transforms.swap_attention.sliding_window import SlidingWindowAttention


@register
@dataclass
class SwapAttention(Transform):
    """Replace the attention of ``layers`` by ``replacement``; at least ``keep`` layers keep full attention."""

    name: ClassVar[str] = "swap_attention"
    identity_settings: ClassVar[dict] = {"layers": []}
    replacement: str = field(default="sliding_window", metadata={"help": "sliding_window | linear"})
    layers: list[int] = field(default_factory=list, metadata={"help": "decoder layers to swap"})
    window: int | None = field(default=None, metadata={"help": "window tokens (default: the replacement's)"})
    sink: int | None = field(default=None, metadata={"help": "sink tokens (default: the replacement's)"})
    windows: list[int] | None = field(default=None, metadata={"help": "one window per entry of layers (overrides window)"})
    keep: int = field(default=1, metadata={"help": "layers that must keep full attention (retrieval needs some)"})

    def __post_init__(self) -> None:
        if self.replacement not in REPLACEMENTS:
            raise LeanLMError(f"unknown attention replacement '{self.replacement}': choose one of {', '.join(REPLACEMENTS)}")
        if self.keep < 0:
            raise LeanLMError(f"keep must be >= 0 full-attention layers, got {self.keep}")
        if self.windows is not None and len(self.windows) != len(self.layers):
            raise LeanLMError(f"windows lists {len(self.windows)} sizes for {len(self.layers)} layers; give one per layer")
        for index in range(len(self.layers)):
            self.settings_for(index)  # window < 1 and other bad values fail here, before any model is touched

    def settings_for(self, position: int) -> ReplacementSettings:
        options = {k: v for k, v in (("window", self.window), ("sink", self.sink)) if v is not None}
        if self.windows is not None:
            options["window"] = self.windows[position]
        return make_settings(self.replacement, options)

    def modify(self, model: nn.Module, **context) -> dict:
        total = len(arch_of(model).layers)
        bad = [i for i in self.layers if not 0 <= i < total]
        if bad:
            raise LeanLMError(f"cannot swap layer {bad[0]}: the model has {total} layers")
        swapped = set(swapped_layers(model)) | set(self.layers)
        if total - len(swapped) < self.keep:
            raise LeanLMError(f"swapping layers {sorted(self.layers)} leaves {total - len(swapped)} of {total} layers with "
                              f"full attention; the recipe keeps at least {self.keep}")
        done = {}
        for position, index in enumerate(self.layers):
            done[str(index)] = swap_layer(model, index, self.replacement, self.settings_for(position)).describe()
        return {"swapped": done, "full_attention_layers": [i for i in range(total) if i not in swapped]}


__all__ = ["REPLACEMENTS", "SWAP_KEY", "LinearAttention", "LinearSettings", "SlidingWindowAttention", "SwapAttention",
           "SwappedAttention", "make_settings", "rebuild_swaps", "swap_layer", "swapped_layers"]
