"""Head importance scores (one dataclass) and the base class every head scorer implements.

Convention for every scorer: higher = more important. ``per_head`` has one value per query head of
each layer; ``per_kv_group`` one per KV head, measured for the group's query heads *together*
(transformers' ``repeat_kv`` layout: query head h reads KV head h // (heads // kv_heads)).
"""

from __future__ import annotations

import json
import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec


@dataclass
class HeadScores:
    """What one scorer measured, with the calibration it used and how long it took."""

    scorer: str
    per_head: list[list[float]]  # (layers, query heads)
    per_kv_group: list[list[float]]  # (layers, kv heads)
    calibration: dict = field(default_factory=dict)  # num_samples, seq_len, tokens, split, dtype
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def save_json(self, path: str | Path) -> None:
        """Write via a temp file in the same folder, then rename: readers never see half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_dict(), handle, indent=2)
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load_json(cls, path: str | Path) -> "HeadScores":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError as err:
            raise LeanLMError(f"no head scores file at '{path}'") from err
        except (json.JSONDecodeError, TypeError) as err:
            raise LeanLMError(f"'{path}' is not a head scores JSON file ({err})") from err

    def ranking(self) -> list[tuple[int, int]]:
        """(layer, head) pairs from least to most important (ties: lower layer, then lower head, first)."""
        pairs = [(layer, head) for layer, row in enumerate(self.per_head) for head in range(len(row))]
        return sorted(pairs, key=lambda pair: (self.per_head[pair[0]][pair[1]], pair))


def kv_groups(num_heads: int, num_kv_heads: int) -> list[list[int]]:
    """The query heads of each KV group: group g holds heads g*size .. (g+1)*size - 1 (repeat_kv)."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise LeanLMError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    size = num_heads // num_kv_heads
    return [list(range(g * size, (g + 1) * size)) for g in range(num_kv_heads)]


def calibration_info(model: nn.Module, batches: list[torch.Tensor]) -> dict:
    """The protocol of a data-driven score; batches come from ``calibration_batches`` (validation)."""
    return {
        "num_samples": sum(batch.shape[0] for batch in batches),
        "seq_len": batches[0].shape[1] if batches else 0,
        "tokens": sum(batch.numel() for batch in batches),
        "split": "validation",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def to_lists(rows: list[torch.Tensor]) -> list[list[float]]:
    return [[float(x) for x in row.tolist()] for row in rows]


@dataclass
class HeadScorer(ABC):
    """One importance measure. Subclasses set ``name`` and implement ``score``."""

    name: ClassVar[str]

    @abstractmethod
    def score(self, model: nn.Module, batches: list[torch.Tensor]) -> HeadScores:
        """Score every query head and KV group; ``batches`` are (batch, seq) LongTensors."""

    @staticmethod
    def check_batches(batches: list[torch.Tensor]) -> None:
        if not batches:
            raise LeanLMError("head scoring needs at least one calibration batch")
        for batch in batches:
            if batch.dim() != 2 or batch.dtype != torch.long:
                raise LeanLMError(f"calibration batches must be (batch, seq) token id tensors, got {tuple(batch.shape)} {batch.dtype}")

    @staticmethod
    def spec_and_groups(model: nn.Module) -> tuple[ModelSpec, list[list[list[int]]]]:
        """The model's shape and, per layer, the query heads of each KV group."""
        spec = ModelSpec.from_model(model)
        groups = [kv_groups(h, kv) for h, kv in zip(spec.heads_per_layer, spec.kv_heads_per_layer)]
        return spec, groups

