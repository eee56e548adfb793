"""The teacher's top-k logits over the windows a run visits, built once and kept on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm



@dataclass
class TeacherTopK:
    """The teacher's k largest logits at every position of the windows a run visits."""

    window_ids: torch.Tensor  # (n,) which rows of `windows` are cached
    values: torch.Tensor  # (n, seq_len, k) float32 logits
    indices: torch.Tensor  # (n, seq_len, k) int32 vocabulary ids

    def __post_init__(self) -> None:
        self._row = {int(w): i for i, w in enumerate(self.window_ids.tolist())}

    def covers(self, ids: list[int]) -> bool:
        return all(i in self._row for i in ids)

    def lookup(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self._row[i] for i in ids])
        return self.values[rows], self.indices[rows]  # (batch, seq_len, k) each

    def save(self, path: Path, fingerprint: str) -> None:
        tensors = {"window_ids": self.window_ids, "values": self.values, "indices": self.indices}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, tmp, metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, fingerprint: str, k: int) -> TeacherTopK | None:
        """The cache at ``path`` if it was built from the same windows with the same k, else None."""
        if not path.is_file():
            return None
        with safe_open(path, framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != fingerprint:
                return None
        tensors = load_file(path)
        if tensors["values"].shape[-1] != k:
            return None
        return cls(tensors["window_ids"], tensors["values"], tensors["indices"])


@torch.no_grad()
def build_teacher_topk(
    teacher: nn.Module, windows: torch.Tensor, ids: list[int], k: int, batch_size: int, accelerator: Accelerator
) -> TeacherTopK:
    """Run the teacher once over windows[ids] and keep its top-k logits per position."""
    ids = sorted(set(ids))
    values, indices = [], []
    bar = tqdm(range(0, len(ids), batch_size), desc=f"teacher top-{k}", disable=not accelerator.is_local_main_process)
    for start in bar:
        batch = windows[ids[start : start + batch_size]].to(accelerator.device)  # (batch, seq_len)
        with accelerator.autocast():
            logits = teacher(input_ids=batch, use_cache=False).logits  # (batch, seq_len, vocab)
        top = logits.float().topk(k, dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        del logits, top  # the full logits are the large tensor here
    return TeacherTopK(torch.tensor(ids), torch.cat(values), torch.cat(indices))
