"""First-order Taylor importance of head gates (Michel et al. 2019, "Are Sixteen Heads Really Better than One?").

Put a gate g_h = 1 on every head's output; the loss change from removing head h (g_h: 1 -> 0) is
to first order -dL/dg_h, so importance = |dL/dg_h|, averaged over calibration batches. For a KV
group the gates of its query heads move together, so its score is |sum of their gradients|.

Scores are stored raw (mean over batches of |gradient| of the mean next-token cross-entropy); no
per-layer normalisation. Michel et al. l2-normalise each layer before a *global* ranking; a user
who wants that can normalise the rows of ``per_head`` themselves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from leanlm.analyze.head_gates import head_gates
from leanlm.analyze.scoring import HeadScorer, HeadScores, calibration_info, to_lists
from leanlm.models.widen import widened_linears


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No weight gradients are needed (or left behind): freeze, then restore each flag."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@dataclass
class TaylorScorer(HeadScorer):
    """|dL/dgate| per head and |sum of the group's gate gradients| per KV group, mean over batches."""

    name: ClassVar[str] = "taylor"

    def score(self, model: nn.Module, batches: list[torch.Tensor]) -> HeadScores:
        self.check_batches(batches)
        start = time.perf_counter()
        spec, _ = self.spec_and_groups(model)
        device = next(model.parameters()).device
        # float32 gates even in a bf16 model: the hook casts them, autograd casts the gradient back.
        gates = [torch.ones(n, device=device, requires_grad=True) for n in spec.heads_per_layer]
        head_sum = [torch.zeros(n, dtype=torch.float64) for n in spec.heads_per_layer]
        group_sum = [torch.zeros(n, dtype=torch.float64) for n in spec.kv_heads_per_layer]
        with frozen_parameters(model), torch.enable_grad(), head_gates(model, gates), widened_linears(model):
            for batch in tqdm(batches, desc="taylor", unit="batch", leave=False):
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss  # mean next-token CE
                # autograd.grad, not backward: nothing accumulates in any .grad attribute.
                grads = torch.autograd.grad(loss, gates)
                for layer, (grad, kv_heads) in enumerate(zip(grads, spec.kv_heads_per_layer)):
                    grad = grad.detach().double().cpu()  # (heads,)
                    head_sum[layer] += grad.abs()
                    group_sum[layer] += grad.view(kv_heads, -1).sum(-1).abs()  # (kv_heads, group) -> (kv_heads,)
        per_head = [row / len(batches) for row in head_sum]
        per_group = [row / len(batches) for row in group_sum]
        return HeadScores(self.name, to_lists(per_head), to_lists(per_group), calibration_info(model, batches),
                          time.perf_counter() - start)
