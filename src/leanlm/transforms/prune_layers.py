"""Layer (block) pruning scored by Block Influence (ShortGPT, Men et al. 2024).

BI_l = 1 - mean over tokens of cos(h_in, h_out), the cosine between the hidden state entering and
leaving block l on calibration text. A block that barely turns the residual stream (BI near 0) is
the cheapest to drop. The result is a stock config with fewer ``num_hidden_layers``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.errors import LeanLMError
from leanlm.models import arch_of, decoder_layers
from leanlm.models.widen import widened_linears
from leanlm.transforms.base import Transform, check_calibration, register
from leanlm.models.compact import KEPT_HEADS_KEY, LAYERS_KEPT_KEY, sync_shape_config

log = logging.getLogger(__name__)


def _first_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.inference_mode()
def block_influence(model: nn.Module, calibration: Sequence[torch.Tensor]) -> list[float]:
    """BI of every decoder block on the calibration batches (higher = more important)."""
    batches = check_calibration(calibration, "block influence")
    layers = decoder_layers(model)
    cos_sum = [0.0] * len(layers)
    tokens = 0
    inputs: dict[int, torch.Tensor] = {}

    def remember_input(index):
        def hook(module, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]  # (batch, seq, hidden)
        return hook

    def add_cosine(index):
        def hook(module, args, kwargs, output):
            h_in, h_out = inputs.pop(index).float(), _first_tensor(output).float()
            cos_sum[index] += torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1).sum().item()
        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(remember_input(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(add_cosine(i), with_kwargs=True))
        device = next(model.parameters()).device
        with widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones
            for batch in tqdm(batches, desc="block influence", disable=len(batches) < 4):
                model(batch.to(device), use_cache=False, logits_to_keep=1)
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [1.0 - total / tokens for total in cos_sum]


def prune_layers(model: nn.Module, layers_to_remove: Sequence[int]) -> nn.Module:
    """Remove whole decoder blocks in place, renumber the rest for the KV cache, update the config."""
    layers = decoder_layers(model)
    remove = set(layers_to_remove)
    bad = sorted(i for i in remove if not 0 <= i < len(layers))
    if bad:
        raise LeanLMError(f"cannot remove layer {bad[0]}: the model has {len(layers)} layers")
    keep = [i for i in range(len(layers)) if i not in remove]
    if not remove:
        return model
    if not keep:
        raise LeanLMError("removing every layer leaves no model; keep at least one")
    arch_of(model).set_layers(keep)  # renumbered for the KV cache; layer_types follow
    config = model.config
    if getattr(config, KEPT_HEADS_KEY, None) is not None:
        setattr(config, KEPT_HEADS_KEY, [getattr(config, KEPT_HEADS_KEY)[i] for i in keep])
    original = getattr(config, LAYERS_KEPT_KEY, None) or list(range(len(layers)))
    setattr(config, LAYERS_KEPT_KEY, [original[i] for i in keep])
    sync_shape_config(model)  # num_hidden_layers, and any per-layer lists
    return model


@register
@dataclass
class PruneLayers(Transform):
    """Drop the ``num_layers`` blocks of lowest Block Influence (needs ``calibration``), or given ``layers``."""

    name: ClassVar[str] = "prune_layers"
    needs: ClassVar[tuple[str, ...]] = ("calibration",)
    identity_settings: ClassVar[dict] = {"num_layers": 0}
    num_layers: int = field(default=1, metadata={"help": "how many blocks to remove (lowest Block Influence first)"})
    layers: list[int] | None = field(default=None, metadata={"help": "explicit block indices to remove; skips scoring "
                                                                     "(num_layers is then ignored)"})

    def __post_init__(self) -> None:
        if self.num_layers < 0:
            raise LeanLMError(f"prune_layers needs num_layers >= 0, got {self.num_layers}")

    def modify(self, model: nn.Module, calibration=None, **context) -> dict:
        total = len(decoder_layers(model))
        scores = None
        if self.layers is not None:
            remove = sorted(set(self.layers))
        elif self.num_layers == 0:
            remove = []  # nothing to rank
        else:
            if self.num_layers >= total:
                raise LeanLMError(f"cannot remove {self.num_layers} of the model's {total} layers; keep at least one")
            scores = block_influence(model, calibration)
            remove = sorted(sorted(range(total), key=lambda i: (scores[i], i))[: self.num_layers])
        log.info("removing layers %s of %d", remove, total)
        prune_layers(model, remove)
        return {
            "layers": remove,
            "layers_before": total,
            "layers_after": total - len(remove),
            "block_influence": scores,
        }
