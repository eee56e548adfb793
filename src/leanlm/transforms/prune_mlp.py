"""MLP intermediate-channel pruning scored by activation x weight magnitude (Wanda-style).

Channel j of a Llama MLP is one row of gate_proj and up_proj and one column of down_proj; its
output is a_j * down_proj[:, j] with a = act(gate(x)) * up(x). Its importance is
mean|a_j| x ||down_proj[:, j]||_2 over calibration tokens. Removing a channel is exact: the rest
of the MLP computes the same thing as before with that channel zeroed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, arch_of
from leanlm.models.widen import widened_linears
from leanlm.transforms.base import (
    Transform,
    check_calibration,
    check_choice,
    check_fraction,
    keep_in_features,
    keep_out_features,
    register,
)
from leanlm.models.compact import sync_shape_config
from leanlm.settings import choices

log = logging.getLogger(__name__)

LAYOUTS = ("global", "uniform")


@torch.inference_mode()
def channel_scores(model: nn.Module, calibration: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, a (intermediate,) tensor of channel importance (higher = more important)."""
    batches = check_calibration(calibration, "MLP channel scoring")
    arch = arch_of(model)
    downs = [arch.mlp(i).down_proj for i in range(len(arch.layers))]
    device = next(model.parameters()).device
    # float32 sums on the model's device: no copy back to the host per batch
    abs_sums = [torch.zeros(down.in_features, device=device) for down in downs]  # (intermediate,)
    tokens = 0

    def accumulate(index):
        def hook(module, args):
            a = args[0].float()  # (batch, seq, intermediate): the input of down_proj
            abs_sums[index] += a.abs().sum(dim=(0, 1))
        return hook

    handles = [down.register_forward_pre_hook(accumulate(i)) for i, down in enumerate(downs)]
    try:
        with widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones
            for batch in tqdm(batches, desc="MLP channel scores", disable=len(batches) < 4):
                model(batch.to(device), use_cache=False, logits_to_keep=1)
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [
        (abs_sum / tokens * down.weight.detach().float().norm(dim=0)).cpu()  # (intermediate,)
        for abs_sum, down in zip(abs_sums, downs)
    ]


def select_channels(scores: Sequence[torch.Tensor], fraction: float, layout: str = "uniform") -> dict[int, list[int]]:
    """The lowest-scoring channels: ``{layer: [channel, ...]}``.

    ``uniform``: the same share of every layer (equal widths stay equal: a stock config).
    ``global``: the lowest ``fraction`` of all channels, ranked together (per-layer widths).
    """
    check_fraction(fraction, "MLP channels")
    check_choice(layout, LAYOUTS, "layout")
    if layout == "uniform":
        remove = {layer: torch.argsort(s)[: round(fraction * len(s))].tolist() for layer, s in enumerate(scores)}
    else:
        flat = torch.cat([s.float() for s in scores])
        layer_of = torch.cat([torch.full((len(s),), layer) for layer, s in enumerate(scores)])
        offsets = [0]
        for s in scores:
            offsets.append(offsets[-1] + len(s))
        lowest = torch.argsort(flat)[: round(fraction * len(flat))]
        remove = {}
        for index in sorted(lowest.tolist()):
            layer = int(layer_of[index])
            remove.setdefault(layer, []).append(index - offsets[layer])
    for layer, channels in remove.items():
        if len(channels) == len(scores[layer]):
            raise LeanLMError(
                f"a fraction of {fraction} means pruning every MLP channel of layer {layer}; use a smaller fraction"
            )
    return {layer: sorted(channels) for layer, channels in sorted(remove.items()) if channels}


def prune_mlp(model: nn.Module, remove: dict[int, list[int]]) -> nn.Module:
    """Physically remove MLP channels in place (gate/up rows, down columns); update the config."""
    arch = arch_of(model)
    for layer, channels in sorted(remove.items()):
        if not 0 <= layer < len(arch.layers):
            raise LeanLMError(f"cannot prune MLP channels of layer {layer}: the model has {len(arch.layers)} layers")
        mlp = arch.mlp(layer)
        width = mlp.width
        drop = set(channels)
        if any(not 0 <= c < width for c in drop):
            raise LeanLMError(f"layer {layer} has {width} MLP channels; a channel index is out of range")
        keep = [c for c in range(width) if c not in drop]
        if not keep:
            raise LeanLMError(f"pruning every MLP channel of layer {layer} is not allowed; keep at least one")
        keep_out_features(mlp.gate_proj, keep)
        keep_out_features(mlp.up_proj, keep)
        keep_in_features(mlp.down_proj, keep)
        if hasattr(mlp.module, "intermediate_size"):
            mlp.module.intermediate_size = len(keep)
    sync_shape_config(model)  # uniform widths -> intermediate_size, else leanlm_intermediate_per_layer
    return model


@contextlib.contextmanager
def mask_channels(model: nn.Module, remove: dict[int, list[int]]):
    """Reference for tests: zero the down_proj columns of the given channels, restore them on exit."""
    saved = {}
    try:
        with torch.no_grad():
            for layer, channels in remove.items():
                down = arch_of(model).mlp(layer).down_proj
                saved[layer] = down.weight.detach().clone()
                down.weight[:, channels] = 0
        yield model
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                arch_of(model).mlp(layer).down_proj.weight.copy_(weight)


@register
@dataclass
class PruneMLP(Transform):
    """Remove the least important MLP channels (needs ``calibration`` batches)."""

    name: ClassVar[str] = "prune_mlp"
    needs: ClassVar[tuple[str, ...]] = ("calibration",)
    identity_settings: ClassVar[dict] = {"fraction": 0.0}
    fraction: float = field(default=0.25, metadata={"help": "share of MLP channels to remove, in [0, 1)"})
    layout: str = field(default="uniform", metadata=choices(LAYOUTS, "uniform: same share per layer (stock config); "
                                                                     "global: ranked together (per-layer widths)"))

    def __post_init__(self) -> None:
        check_fraction(self.fraction, "MLP channels")
        check_choice(self.layout, LAYOUTS, "layout")

    def modify(self, model: nn.Module, calibration=None, **context) -> dict:
        before = ModelSpec.from_model(model).intermediate_per_layer
        remove = select_channels(channel_scores(model, calibration), self.fraction, self.layout)
        prune_mlp(model, remove)
        after = ModelSpec.from_model(model).intermediate_per_layer
        achieved = 1 - sum(after) / sum(before)
        log.info("removed %.4f of the MLP channels (asked for %.4f)", achieved, self.fraction)
        return {
            "channels_per_layer_before": list(before),
            "channels_per_layer_after": list(after),
            "fraction_requested": self.fraction,
            "fraction_achieved": achieved,
            "layout": self.layout,
        }
