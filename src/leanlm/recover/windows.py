"""Training windows (WikiText-2 validation) and the fixed order a run visits them in (seed, step)."""

from __future__ import annotations

import functools
import hashlib

import torch

from leanlm.data import tokenize_split
from leanlm.errors import LeanLMError


def training_windows(tokenizer, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of WikiText-2 *validation*, (num_windows, seq_len) LongTensor.

    There is deliberately no split argument: training must never see the test split we report on.
    ``limit`` keeps the first windows only.
    """
    if seq_len < 2:
        raise LeanLMError(f"seq_len must be at least 2, got {seq_len}")
    if limit is not None and limit < 1:
        raise LeanLMError(f"limit must be positive when set, got {limit}")
    ids = tokenize_split(tokenizer, "validation")  # (tokens,)
    count = len(ids) // seq_len
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise LeanLMError(f"WikiText-2 validation has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len).clone()  # (num_windows, seq_len)


@functools.lru_cache(maxsize=8)
def _epoch_order(num_windows: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_windows, generator=generator).tolist())


def stream_windows(num_windows: int, seed: int, start: int, count: int) -> list[int]:
    """Window ids at positions start .. start+count-1 of an endless stream of seeded epoch permutations.

    A step's batch is a slice of this stream at an offset fixed by the step, so it depends only on
    (seed, step) and a resumed run sees exactly the batches an uninterrupted one would.
    """
    ids = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_windows)
        ids.append(_epoch_order(num_windows, seed, epoch)[offset])
    return ids


def windows_fingerprint(windows: torch.Tensor) -> str:
    """A short hash of the training windows, so a resume on different data is refused."""
    digest = hashlib.sha256(str(tuple(windows.shape)).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
