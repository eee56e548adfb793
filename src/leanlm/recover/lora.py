"""LoRA adapters through `peft`: add them for recovery training, merge them back for export.

peft wraps any ``nn.Linear``, whatever its shape, so pruned models whose layers have different
head counts (a narrower q_proj/o_proj in some layers) take adapters like any other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models.arch import ATTENTION_PROJECTIONS, MLP_PROJECTIONS


@dataclass
class LoraSettings:
    """Where LoRA adapters go and how big they are."""

    rank: int = field(default=8, metadata={"help": "rank r of each adapter (A: in x r, B: r x out)"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: the update is (alpha / rank) * B A x"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input (0 keeps training deterministic)"})
    targets: tuple[str, ...] = field(
        default=ATTENTION_PROJECTIONS, metadata={"help": "names of the linear modules that get adapters"}
    )
    include_mlp: bool = field(default=False, metadata={"help": "also adapt gate_proj, up_proj and down_proj"})
    seed: int = field(default=0, metadata={"help": "seed of the adapters' random init (lora_A), so runs repeat"})

    def target_modules(self) -> list[str]:
        names = list(self.targets) + (list(MLP_PROJECTIONS) if self.include_mlp else [])
        return list(dict.fromkeys(names))  # drop duplicates, keep order

    def check(self) -> None:
        if self.rank < 1:
            raise LeanLMError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LeanLMError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules():
            raise LeanLMError("LoRA needs at least one target module (targets is empty)")


def add_lora(model: nn.Module, settings: LoraSettings | None = None) -> PeftModel:
    """Wrap ``model`` with LoRA adapters; only the adapters are trainable afterwards.

    The model is modified in place (peft swaps its target linears for LoRA layers); keep using
    the returned PeftModel. Adapters start as an exact no-op (lora_B = 0).
    """
    settings = settings or LoraSettings()
    settings.check()
    if isinstance(model, PeftModel):
        raise LeanLMError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules(),
        task_type="CAUSAL_LM",
    )
    # Seed only the adapter init, without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # peft: "Target modules ... not found in the base model"
            raise LeanLMError(
                f"LoRA targets {settings.target_modules()} do not match any module of the model"
            ) from err


def merge_lora(model: PeftModel) -> nn.Module:
    """Fold the adapters into the base weights and return the plain base model (no LoRA modules)."""
    if not isinstance(model, PeftModel):
        raise LeanLMError("merge_lora needs a model returned by add_lora (a peft PeftModel)")
    return model.merge_and_unload()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, e.g. for a report line."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
