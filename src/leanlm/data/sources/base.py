"""What every data source is: a token stream, cut into windows deterministically for a seed.

A source knows how to produce one 1-D stream of token ids for a tokenizer (``token_ids``) and how
to describe what it read (``describe``: source, path, sha256, tokens), which is recorded in every
output's ``protocol``. Windows are cut from that stream the same way for every source:
- ``training_windows``: back-to-back windows, a partial tail dropped (distillation);
- ``sample_windows``: ``count`` windows at random starts drawn from a seeded generator (calibration).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from leanlm.errors import LeanLMError


@dataclass
class DataContext:
    """What a source may need besides its own settings."""

    tokenizer: object
    model: str | None = None  # the original model (name, directory, .gguf, hub id): what `teacher` samples from
    loaded: object = None  # that model, already loaded (spares a second load); None = load on demand
    device: str = "auto"  # where `teacher` generates when it has to load the model


@dataclass
class DataSource(ABC):
    """One kind of text. Subclasses set ``name`` and implement ``token_ids`` and ``describe``.

    Settings are dataclass fields (built from a spec string or a recipe mapping); ``check`` runs the
    cheap checks (a file is there) before any model is loaded.
    """

    name: ClassVar[str]

    def check(self) -> None:
        """Cheap checks that need no tokenizer and no model (e.g. the file exists); raise LeanLMError."""

    @abstractmethod
    def token_ids(self, ctx: DataContext) -> torch.Tensor:
        """The whole source as one (tokens,) LongTensor, no special tokens added."""

    @abstractmethod
    def describe(self) -> dict:
        """What was read, for results' ``protocol`` (call after ``token_ids``)."""

    def label(self) -> str:
        """The spec string of this source (``name`` + its non-default settings)."""
        changed = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != f.default]
        return ":".join([self.name, *changed])

    def stream(self, ctx: DataContext) -> torch.Tensor:
        """``token_ids`` once per tokenizer and model (memoised on this source object)."""
        memo = self.__dict__.setdefault("_memo", {})
        key = (id(ctx.tokenizer), ctx.model)
        if key not in memo:
            ids = self.token_ids(ctx)
            if ids.numel() == 0:
                raise LeanLMError(f"data source '{self.label()}' holds no tokens")
            memo[key] = ids
        return memo[key]

    def tokens_read(self) -> int | None:
        """Length of the stream read so far (None before ``stream``)."""
        memo = self.__dict__.get("_memo") or {}
        return len(next(iter(memo.values()))) if memo else None

    def training_windows(self, ctx: DataContext, seq_len: int, limit: int | None = None) -> torch.Tensor:
        """Back-to-back windows of the stream, (num_windows, seq_len); ``limit`` keeps the first ones."""
        ids = self.stream(ctx)
        count = len(ids) // seq_len if limit is None else min(len(ids) // seq_len, limit)
        if count == 0:
            raise LeanLMError(f"data source '{self.label()}' has {len(ids)} tokens, fewer than one window of {seq_len}")
        return ids[: count * seq_len].reshape(count, seq_len).clone()  # (num_windows, seq_len)

    def sample_windows(self, ctx: DataContext, seq_len: int, count: int, seed: int) -> torch.Tensor:
        """``count`` windows at seeded random starts, (count, seq_len) (WikiText calibration's old draw)."""
        ids = self.stream(ctx)
        if len(ids) <= seq_len:
            raise LeanLMError(f"data source '{self.label()}' has {len(ids)} tokens, too few for windows of {seq_len}")
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - seq_len, (count,), generator=generator)
        return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])  # (count, seq_len)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """One long text → (tokens,) ids, no special tokens (we window it ourselves, so no length warning)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


SOURCES: dict[str, type[DataSource]] = {}


def register(cls: type[DataSource]) -> type[DataSource]:
    """Class decorator: add a source to ``SOURCES`` under its ``name``."""
    SOURCES[cls.name] = cls
    return cls
