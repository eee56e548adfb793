"""Data sources for calibration and distillation: one ``data`` setting, a mix of weighted sources.

    mix = DataMix.parse("teacher@0.5,wikitext@0.5")          # or a recipe list, see spec.py
    ctx = DataContext(tokenizer, model="smollm2-135m")          # teacher samples from this model
    windows = mix.training(ctx, seq_len=256)                    # (num_windows, 256), distillation
    batches = mix.calibration(ctx, count=8, seq_len=128, seed=0)  # (8, 128), scorers
    record = mix.describe()                                     # what was read: for results' protocol

One file per source (``wikitext``, ``file``, ``jsonl``, ``hf``, ``teacher``) behind ``DataSource``
and the ``SOURCES`` registry. A mix's windows are deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanlm.data.sources import file, hf, jsonl, teacher, wikitext  # noqa: F401  (register the sources)
from leanlm.data.sources.base import SOURCES, DataContext, DataSource, register
from leanlm.data.sources.spec import HINT, parse_spec
from leanlm.data.sources.teacher import TeacherSource
from leanlm.errors import LeanLMError

DEFAULT_DATA = "wikitext"


def _shares(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` into integer shares proportional to ``weights`` (largest remainder, ties to the first)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class DataMix:
    """Weighted data sources; weights are shares of the windows drawn (normalised to sum 1)."""

    parts: list[tuple[DataSource, float]]
    used: dict = field(default_factory=dict)  # what the last training / calibration call drew

    @classmethod
    def parse(cls, value=None) -> DataMix:
        """From a spec string, a recipe list, a DataMix or None (= wikitext); LeanLMError on a bad setting."""
        return value if isinstance(value, DataMix) else cls(parse_spec(value))

    @property
    def weights(self) -> list[float]:
        total = sum(w for _, w in self.parts)
        return [w / total for _, w in self.parts]

    def label(self) -> str:
        if len(self.parts) == 1:
            return self.parts[0][0].label()
        return ",".join(f"{s.label()}@{w:g}" for s, w in zip((s for s, _ in self.parts), self.weights))

    def training(self, ctx: DataContext, seq_len: int, limit: int | None = None) -> torch.Tensor:
        """Back-to-back windows of each source, (num_windows, seq_len), sources in order.

        A source contributes its first windows in proportion to its weight; the scarcest source
        (relative to its weight) sets the total, so no window is repeated.
        """
        if seq_len < 2:
            raise LeanLMError(f"seq_len must be at least 2, got {seq_len}")
        if limit is not None and limit < 1:
            raise LeanLMError(f"limit must be positive when set, got {limit}")
        every = [source.training_windows(ctx, seq_len) for source, _ in self.parts]
        total = min(int(len(w) / share + 1e-9) for w, share in zip(every, self.weights))
        counts = [min(len(w), c) for w, c in zip(every, _shares(min(total, limit or total), self.weights))]
        if sum(counts) == 0:
            raise LeanLMError(f"data '{self.label()}' gives no window of {seq_len} tokens at these weights")
        self.used = {"use": "training", "seq_len": seq_len, "windows": counts}
        return torch.cat([w[:c] for w, c in zip(every, counts)])  # (num_windows, seq_len)

    def calibration(self, ctx: DataContext, count: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """``count`` windows at seeded random starts, shared among the sources by weight, (count, seq_len)."""
        if count < 1 or seq_len < 2:
            raise LeanLMError("calibration needs count >= 1 and seq_len >= 2")
        counts = _shares(count, self.weights)
        drawn = [source.sample_windows(ctx, seq_len, n, seed + i) for i, ((source, _), n) in enumerate(zip(self.parts, counts)) if n]
        self.used = {"use": "calibration", "seq_len": seq_len, "windows": counts, "seed": seed}
        return torch.cat(drawn)  # (count, seq_len)

    def describe(self) -> dict:
        """The protocol record: the spec, and per source what it read (path, sha256, tokens) and its windows."""
        windows = self.used.get("windows", [None] * len(self.parts))
        sources = [{**source.describe(), "weight": w, "windows": n}
                   for (source, _), w, n in zip(self.parts, self.weights, windows)]
        return {"spec": self.label(), **{k: v for k, v in self.used.items() if k != "windows"}, "sources": sources}


__all__ = ["DEFAULT_DATA", "HINT", "SOURCES", "DataContext", "DataMix", "DataSource", "TeacherSource", "register"]
