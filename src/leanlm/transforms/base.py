"""The base of every structural transform, its registry, and the Linear-slicing helpers they share.

A transform is a typed config dataclass whose ``apply(model, **context)`` changes the model in place
and returns a ``TransformReport``. Each technique file decorates its class with ``@register``, so
``TRANSFORMS`` (name -> class) lists every technique and ``Transform.from_dict({"name": ..., ...})``
builds any of them from a recipe item. The context carries what a transform may need and the
pipeline provides when the transform's ``needs`` names it: ``scores`` (head scores from
``leanlm.analyze``, computed with the scorer the transform's ``scorer`` setting names), ``calibration``
(a list of ``(batch, seq)`` LongTensors of token ids), ``tokenizer``. A transform ignores context it
does not use. Every transform must be the identity at its no-change setting (``identity_settings``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models.weights import param_count, resize_linear  # noqa: F401  (re-exported)
from leanlm.settings import build, to_plain


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


CONTEXT_KEYS = ("scores", "calibration", "tokenizer")  # what a transform's ``needs`` may name


@dataclass
class Transform(ABC):
    """One structural technique. Subclasses are dataclasses of their options and implement ``modify``."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()  # context the pipeline must build for ``apply`` (CONTEXT_KEYS)
    identity_settings: ClassVar[dict[str, Any]] = {}  # settings at which the transform changes nothing

    @classmethod
    def from_dict(cls, options: dict) -> "Transform":
        """Build from recipe options; every unknown key or bad value is reported in one LeanLMError.

        On the base class, ``options["name"]`` picks the technique from ``TRANSFORMS``.
        """
        errors: list[str] = []
        built = transform_from_dict(options, "", errors, cls if cls is not Transform else None)
        if errors:
            raise LeanLMError("; ".join(errors))
        return built

    def to_dict(self) -> dict:
        """``{"name": ..., settings}``: the recipe item that builds this transform again."""
        return {"name": self.name, **to_plain(self)}

    def apply(self, model: nn.Module, **context) -> TransformReport:
        """Change ``model`` in place and report what went and the parameter counts around it."""
        before = param_count(model)
        removed = self.modify(model, **context)
        return TransformReport(self.name, removed, before, param_count(model))

    @abstractmethod
    def modify(self, model: nn.Module, **context) -> dict[str, Any]:
        """Change the model in place; return a JSON-able description of what was removed."""


TRANSFORMS: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    """Class decorator: make a technique reachable by its ``name`` from recipes and the CLI."""
    if cls.name in TRANSFORMS and TRANSFORMS[cls.name] is not cls:
        raise ValueError(f"two transforms are named '{cls.name}'")
    bad = [key for key in cls.needs if key not in CONTEXT_KEYS]
    if bad:
        raise ValueError(f"{cls.__name__} needs unknown context {bad}; known: {CONTEXT_KEYS}")
    TRANSFORMS[cls.name] = cls
    return cls


def transform_from_dict(item, where: str, errors: list[str], cls: type[Transform] | None = None) -> Transform | None:
    """Build one transform from ``{"name": ..., settings}``; problems go to ``errors`` (None on failure).

    ``where`` names the item in messages (e.g. ``"transforms[1]"``); with ``cls`` the name is optional.
    """
    label = where or "transform"
    if not isinstance(item, dict):
        errors.append(f"'{label}' must be a mapping like {{name: prune_heads, fraction: 0.25}}, got {item!r}")
        return None
    options = dict(item)
    name = options.pop("name", None if cls is None else cls.name)
    if cls is None:
        if name not in TRANSFORMS:
            what = f"unknown transform '{name}'" if name is not None else "no transform 'name'"
            errors.append(f"'{label}': {what}; choose one of {', '.join(TRANSFORMS)}")
            return None
        cls = TRANSFORMS[name]
    elif name != cls.name:
        errors.append(f"'{label}': name '{name}' does not match {cls.name}")
        return None
    prefix = f"{where}." if where else f"{cls.name}."
    return build(cls, options, prefix, errors)


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
