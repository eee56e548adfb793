"""The slow tier: where closed sentences' token K/V live (CPU tensors, or a memory-mapped file)."""

from __future__ import annotations

import os
import tempfile
import weakref
from typing import NamedTuple

import numpy as np
import torch

from leanlm.kvcache.base import tensor_bytes


class SlowStore:
    """Where closed sentences' token K/V live. ``get`` returns fresh tensors (the fetch is a real copy)."""

    def put(self, sentence: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def get(self, sentence: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t`` (pinned when ``t`` is on a GPU, so copies back can be asynchronous)."""
    return t.to("cpu", copy=True).pin_memory() if t.is_cuda else t.to("cpu", copy=True)


class MemoryStore(SlowStore):
    """CPU tensors (pinned when the K/V come from a GPU, so fetches can be asynchronous copies)."""

    def __init__(self):
        self.sentences: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, sentence, keys, values):
        self.sentences[sentence] = to_host(keys), to_host(values)

    def get(self, sentence, device):
        keys, values = self.sentences[sentence]
        return keys.to(device, copy=True), values.to(device, copy=True)

    def nbytes(self) -> int:
        return sum(tensor_bytes(*pair) for pair in self.sentences.values())

    def clear(self) -> None:
        self.sentences.clear()


class Block(NamedTuple):
    offset: int  # bytes into the file
    shape: tuple[int, ...]  # of keys and of values, (batch, kv_heads, tokens, head_dim)
    dtype: torch.dtype


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes, exactly (bf16 included: numpy has no bf16, so go through uint8)."""
    return t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()


def remove_file(file, path: str) -> None:
    file.close()
    if os.path.exists(path):
        os.remove(path)


class MmapStore(SlowStore):
    """Sentence K/V as raw bytes appended to one file (keys, then values), read through a memory map.

    The file is created in ``directory`` (default: the system temp dir) and removed with the store.
    """

    def __init__(self, directory: str | None = None, prefix: str = "sentence-kv-"):
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=".kv", dir=directory)
        self.file = os.fdopen(fd, "wb")
        self.blocks: dict[int, Block] = {}
        self.size = 0  # bytes written
        self.map: np.memmap | None = None
        weakref.finalize(self, remove_file, self.file, self.path)

    def put(self, sentence, keys, values):
        block = np.concatenate([raw_bytes(keys), raw_bytes(values)])
        self.file.write(block.tobytes())
        self.file.flush()
        self.blocks[sentence] = Block(self.size, tuple(keys.shape), keys.dtype)
        self.size += block.nbytes

    def get(self, sentence, device):
        offset, shape, dtype = self.blocks[sentence]
        if self.map is None or self.map.shape[0] < self.size:  # the file grew since it was mapped
            self.map = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.size,))
        half = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        raw = torch.from_numpy(np.array(self.map[offset:offset + 2 * half]))  # the copy out of the file
        keys, values = raw[:half].view(dtype).view(shape), raw[half:].view(dtype).view(shape)
        return keys.to(device), values.to(device)

    def nbytes(self) -> int:
        return self.size

    def clear(self) -> None:
        self.file.truncate(0)
        self.file.seek(0)
        self.blocks, self.size, self.map = {}, 0, None


SLOW_STORES = {"memory": MemoryStore, "mmap": MmapStore}
