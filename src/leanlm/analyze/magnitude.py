"""Weight magnitude: the Frobenius norm of each head's slice of o_proj (data-free baseline).

A head can only write into the residual stream through its o_proj columns, so a small slice bounds
how much it can change. Cheap and crude: it ignores how large the head's outputs actually are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from leanlm.analyze.scoring import HeadScorer, HeadScores, to_lists
from leanlm.models import arch_of


@dataclass
class MagnitudeScorer(HeadScorer):
    """||W_o[:, head columns]||_F per query head and over the group's combined columns per KV group."""

    name: ClassVar[str] = "magnitude"

    def score(self, model: nn.Module, batches: list[torch.Tensor] | None = None) -> HeadScores:
        start = time.perf_counter()
        spec, _ = self.spec_and_groups(model)  # also checks heads % kv_heads
        per_head, per_group = [], []
        with torch.no_grad():
            for view, heads, kv_heads in zip(arch_of(model).attentions(), spec.heads_per_layer, spec.kv_heads_per_layer):
                weight = view.o_proj.weight.float()  # (hidden, heads * head_dim)
                by_head = weight.view(weight.shape[0], heads, spec.head_dim)  # (hidden, heads, head_dim)
                per_head.append(by_head.norm(dim=(0, 2)))  # (heads,)
                # A group's query heads are adjacent (repeat_kv), so its columns are one contiguous block.
                by_group = weight.view(weight.shape[0], kv_heads, -1)  # (hidden, kv_heads, group * head_dim)
                per_group.append(by_group.norm(dim=(0, 2)))  # (kv_heads,)
        calibration = {"num_samples": 0, "seq_len": 0, "tokens": 0, "split": None,
                       "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        return HeadScores(self.name, to_lists(per_head), to_lists(per_group), calibration, time.perf_counter() - start)
