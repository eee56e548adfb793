"""Sentence summaries (mean key, principal directions or bounds) and how a step's queries rank them."""

from __future__ import annotations

import torch


def summarize(keys: torch.Tensor, components: int, bounds: bool = False) -> torch.Tensor:
    """keys (batch, kv_heads, n, head_dim) → (batch, kv_heads, m, head_dim).

    Row 0 is the mean key. ``bounds``: rows 1, 2 are the channel-wise min and max of the keys
    (m = 3). Else rows 1.. are the top principal directions of the keys, scaled by their standard
    deviation (zero rows when the sentence has fewer tokens than components; m = 1 + components).
    """
    mean = keys.float().mean(dim=2, keepdim=True)  # (batch, kv_heads, 1, head_dim)
    if bounds:
        return torch.cat([mean.to(keys.dtype), keys.amin(dim=2, keepdim=True), keys.amax(dim=2, keepdim=True)], dim=2)
    if components == 0:
        return mean.to(keys.dtype)
    _, spread, directions = torch.linalg.svd(keys.float() - mean, full_matrices=False)  # (.., r), (.., r, d)
    r = min(components, spread.shape[-1])
    scaled = directions[..., :r, :] * (spread[..., :r, None] / keys.shape[2] ** 0.5)
    pad = keys.new_zeros(*keys.shape[:2], components - r, keys.shape[3], dtype=torch.float32)
    return torch.cat([mean, scaled, pad], dim=2).to(keys.dtype)


def sentence_scores(queries: torch.Tensor, summaries: torch.Tensor, vote: bool = False,
                    bounds: bool = False) -> torch.Tensor:
    """How much this step's queries want each sentence: (n,), shared by the batch and the KV heads.

    queries (batch, heads, q, d); summaries (batch, kv_heads, n, m, d). Per query head and query,
    logit = q·mean key plus, for principal directions, |q·direction| (the spread of the sentence's
    logits); with ``bounds`` (summaries = mean, min, max) logit = q⁺·max + q⁻·min, the largest q·k
    any token of the sentence can reach (Quest's page bound). ``vote=False``: the logits averaged over the batch, the heads and the step's queries.
    ``vote=True``: each query head and query turns its logits into a distribution over sentences
    (softmax at 1/√d, as attention would) and the distributions are averaged — a sentence a few
    queries want strongly (a question's answer) is not drowned by a long chunk's average query.
    """
    batch, heads, q_len, dim = queries.shape
    kv_heads = summaries.shape[1]
    grouped = queries.float().view(batch, kv_heads, heads // kv_heads, q_len, dim)
    if bounds:
        low, high = summaries[:, :, :, 1].float(), summaries[:, :, :, 2].float()  # (batch, kv, n, d)
        logits = (torch.einsum("bhgqd,bhnd->bhgqn", grouped.clamp(min=0), high)
                  + torch.einsum("bhgqd,bhnd->bhgqn", grouped.clamp(max=0), low))
    else:
        logits = torch.einsum("bhgqd,bhnmd->bhgqnm", grouped, summaries.float())
        logits = logits[..., 0] + logits[..., 1:].abs().sum(dim=-1)  # (batch, kv, group, q, n)
    if vote:
        logits = torch.softmax(logits / dim**0.5, dim=-1)
    return logits.mean(dim=(0, 1, 2, 3))
