"""Training windows (the `data` setting, WikiText-2 validation by default) and the fixed order a run visits them in (seed, step)."""

from __future__ import annotations

import functools
import hashlib

import torch



def training_windows(tokenizer, seq_len: int, limit: int | None = None, data=None, model: str | None = None,
                     loaded=None) -> torch.Tensor:
    """Back-to-back windows of the ``data`` setting (default WikiText-2 *validation*), (num_windows, seq_len).

    ``data``: a spec string, a recipe list or a ``DataMix`` (``leanlm.data.sources``); ``model`` /
    ``loaded`` name the teacher for the ``teacher`` source. There is deliberately no split argument:
    training must never see the test split we report on. ``limit`` keeps the first windows only.
    """
    from leanlm.data.sources import DataContext, DataMix

    return DataMix.parse(data).training(DataContext(tokenizer, model, loaded), seq_len, limit)


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
