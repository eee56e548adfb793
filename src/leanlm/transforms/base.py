"""The base of every structural transform, and the Linear-slicing helpers they share.

A transform is a typed config dataclass whose ``apply(model, **context)`` changes the model in place
and returns a ``TransformReport``. The context carries what a transform may need and the pipeline
already has: ``scores`` (head scores from ``leanlm.analyze``), ``calibration`` (a list of
``(batch, seq)`` LongTensors of token ids), ``tokenizer``. A transform ignores context it does not use.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models.weights import param_count, resize_linear  # noqa: F401  (resize_linear: re-exported)


@dataclass
class TransformReport:
    """What one transform did: JSON-able, so it goes straight into results.json."""

    name: str
    removed: dict[str, Any]  # technique-specific: which heads / layers / channels went, fractions
    params_before: int
    params_after: int

    @property
    def params_removed(self) -> int:
        return self.params_before - self.params_after

    def to_dict(self) -> dict:
        return {**asdict(self), "params_removed": self.params_removed}


@dataclass
class Transform(ABC):
    """One structural technique. Subclasses are dataclasses of their options and implement ``modify``."""

    name: ClassVar[str]

    @classmethod
    def from_dict(cls, options: dict) -> "Transform":
        """Build from recipe options; an unknown key is a user mistake, not a silent default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LeanLMError(f"{cls.name} has no option {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        return cls(**options)

    def apply(self, model: nn.Module, **context) -> TransformReport:
        """Change ``model`` in place and report what went and the parameter counts around it."""
        before = param_count(model)
        removed = self.modify(model, **context)
        return TransformReport(self.name, removed, before, param_count(model))

    @abstractmethod
    def modify(self, model: nn.Module, **context) -> dict[str, Any]:
        """Change the model in place; return a JSON-able description of what was removed."""


def check_fraction(fraction: float, what: str) -> None:
    if not 0.0 <= fraction < 1.0:
        raise LeanLMError(f"the fraction of {what} to remove must be in [0, 1), got {fraction}")


def check_choice(value: str, choices: Sequence[str], option: str) -> None:
    if value not in choices:
        raise LeanLMError(f"unknown {option} '{value}': choose one of {', '.join(choices)}")


def head_rows(heads: Sequence[int], head_dim: int) -> list[int]:
    """Row indices of q/k/v_proj (or column indices of o_proj) that belong to the given heads."""
    return [h * head_dim + d for h in heads for d in range(head_dim)]


# Slicing replaces the Parameter but keeps the Linear module itself, so hooks and names survive.
@torch.no_grad()
def keep_out_features(linear: nn.Linear, index: Sequence[int]) -> None:
    """Keep only the given output features (weight rows, bias entries)."""
    idx = torch.as_tensor(index, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(0, idx), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, idx), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(index)


@torch.no_grad()
def keep_in_features(linear: nn.Linear, index: Sequence[int]) -> None:
    """Keep only the given input features (weight columns; the bias is per output, so it stays)."""
    idx = torch.as_tensor(index, dtype=torch.long, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(1, idx), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(index)


@torch.no_grad()
def scatter_out_features(linear: nn.Linear, index: Sequence[int], size: int) -> None:
    """Grow to ``size`` outputs: the current rows go to ``index``, every other row (and bias) is zero."""
    idx = torch.as_tensor(index, dtype=torch.long, device=linear.weight.device)
    weight = linear.weight.new_zeros(size, linear.in_features)
    weight[idx] = linear.weight
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.new_zeros(size)
        bias[idx] = linear.bias
        linear.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    linear.out_features = size


@torch.no_grad()
def scatter_in_features(linear: nn.Linear, index: Sequence[int], size: int) -> None:
    """Grow to ``size`` inputs: the current columns go to ``index``, every other column is zero."""
    idx = torch.as_tensor(index, dtype=torch.long, device=linear.weight.device)
    weight = linear.weight.new_zeros(linear.out_features, size)
    weight[:, idx] = linear.weight
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    linear.in_features = size


def check_calibration(calibration, who: str) -> list[torch.Tensor]:
    """Calibration batches: a non-empty list of (batch, seq) LongTensors (a single tensor is accepted)."""
    if isinstance(calibration, torch.Tensor):
        calibration = [calibration]
    if not calibration:
        raise LeanLMError(f"{who} needs calibration batches of token ids to score the model; none were given")
    for batch in calibration:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype != torch.long:
            raise LeanLMError(f"{who} expects calibration batches as (batch, seq) LongTensors of token ids")
    return list(calibration)
