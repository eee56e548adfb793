"""The calibrated parts of the latent-KV conversion: statistics, RoPE pair choice, whitened joint SVD.

- ``collect_stats`` runs calibration windows through the model and keeps, per layer, the attention
  input's second moment X^T X (float64) and the mean 2-norm of every (head, frequency pair) of q and k.
- ``choose_pairs``: per KV head, the r frequency pairs with the largest sum over its query heads of
  mean‖q_pair‖ · mean‖k_pair‖ (``norm``: MHA2MLA's 2-norm criterion, an upper bound of the pair's share
  of q·k), or of the attention-weighted change of the scores when the pair loses RoPE (``attention``).
- ``whitened_svd``: W = [W_k_nope; W_v] (the no-RoPE key rows and every value row of the layer) is
  factored as up · down minimising ‖(W − up · down) X^T‖ on the calibration inputs: with C = X^T X / n
  = L L^T, the SVD of W L gives up = U_r and down = S_r V_r^T L^{-1}. Optionally each row is weighted
  first (``weighting="qo"``): a key channel by the RMS of the queries that read it, a value channel by
  the norm of the o_proj columns that read it. On SmolLM2 that was worse than the plain joint SVD
  (perplexity 359 against 216 at 4x fewer KV bytes, before recovery), so it is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leanlm.models.arch import AttentionView, arch_of
from leanlm.recover.layer_local import attention_input_pass


QUERY_STRIDE = 8  # rope_removal_error scores every 8th query (the statistic, not the fit, needs few)


@dataclass
class LayerStats:
    """Calibration statistics of one attention layer's input and projections."""

    xtx: torch.Tensor  # (hidden, hidden) float64, sum over tokens of x x^T
    tokens: int
    q_pair_norm: torch.Tensor  # (heads, head_dim/2) sum over tokens of ‖q pair‖
    k_pair_norm: torch.Tensor  # (kv_heads, head_dim/2)
    q_square: torch.Tensor  # (heads, head_dim) sum over tokens of q²
    pair_error: torch.Tensor  # (heads, head_dim/2) sum over queries of Σ_t p(t) |score change without RoPE|

    def add(self, view: AttentionView, hidden: torch.Tensor, position_embeddings) -> None:
        x = hidden.reshape(-1, hidden.shape[-1]).double()  # (tokens, hidden)
        self.xtx += x.T @ x
        self.tokens += x.shape[0]
        q = view.q_proj(hidden).reshape(x.shape[0], -1, view.head_dim).double()  # (tokens, heads, head_dim)
        k = view.k_proj(hidden).reshape(x.shape[0], -1, view.head_dim).double()  # (tokens, kv_heads, head_dim)
        self.q_pair_norm += pair_norms(q).sum(0)
        self.k_pair_norm += pair_norms(k).sum(0)
        self.q_square += (q**2).sum(0)
        self.pair_error += rope_removal_error(view, hidden, position_embeddings)


def rope_removal_error(view: AttentionView, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(heads, head_dim/2): per frequency pair, Σ over queries of Σ_t p(t) |Δ score_t| when that pair
    loses RoPE, p the original attention weights (causal). Low frequencies barely rotate over a
    window and cost little; pairs that carry position where attention looks cost much."""
    batch, seq, _ = hidden.shape
    hd, group = view.head_dim, view.num_heads // view.num_kv_heads
    q = view.q_proj(hidden).view(batch, seq, -1, hd).transpose(1, 2).float()  # (batch, heads, seq, head_dim)
    k = view.k_proj(hidden).view(batch, seq, -1, hd).transpose(1, 2).float().repeat_interleave(group, 1)
    cos, sin = (t.float() for t in position_embeddings)
    qr, kr = apply_rotary_pos_emb(q, k, cos, sin)
    rows = torch.arange(seq - 1, -1, -QUERY_STRIDE, device=q.device).flip(0)  # every QUERY_STRIDE-th query
    q, qr = q[:, :, rows], qr[:, :, rows]  # (batch, heads, queries, head_dim)
    causal = torch.arange(seq, device=q.device)[None, :] <= rows[:, None]  # (queries, seq)
    probs = (qr @ kr.transpose(-1, -2) * view.scaling).masked_fill(~causal, float("-inf")).softmax(-1)
    half = hd // 2
    errors = []
    for j in range(half):
        pair = [j, j + half]
        with_rope = qr[..., pair] @ kr[..., pair].transpose(-1, -2)  # (batch, heads, queries, seq)
        without = q[..., pair] @ k[..., pair].transpose(-1, -2)
        errors.append((probs * (with_rope - without).abs()).sum((-1, -2)).sum(0))  # (heads,)
    return torch.stack(errors, dim=-1).double() * view.scaling * QUERY_STRIDE  # (heads, head_dim/2)


def pair_norms(states: torch.Tensor) -> torch.Tensor:
    """(..., head_dim) → (..., head_dim/2): the 2-norm of each rotate_half pair (p, p + head_dim/2)."""
    half = states.shape[-1] // 2
    return (states[..., :half] ** 2 + states[..., half:] ** 2).sqrt()


@torch.no_grad()
def collect_stats(model: nn.Module, calibration: list[torch.Tensor]) -> list[LayerStats]:
    """Run the calibration batches (use_cache off) and gather ``LayerStats`` for every layer."""
    arch = arch_of(model)
    views = arch.attentions()
    stats = []
    for view in views:
        hidden, hd = view.q_proj.in_features, view.head_dim
        stats.append(LayerStats(torch.zeros(hidden, hidden, dtype=torch.float64), 0,
                                torch.zeros(view.num_heads, hd // 2, dtype=torch.float64),
                                torch.zeros(view.num_kv_heads, hd // 2, dtype=torch.float64),
                                torch.zeros(view.num_heads, hd, dtype=torch.float64),
                                torch.zeros(view.num_heads, hd // 2, dtype=torch.float64)))
    callbacks = {i: (lambda hidden, kwargs, view=view, layer_stats=layer_stats:
                     layer_stats.add(view, hidden, kwargs["position_embeddings"]))
                 for i, (view, layer_stats) in enumerate(zip(views, stats))}
    attention_input_pass(model, calibration, callbacks)
    return stats


def choose_pairs(stats: LayerStats, rope_pairs: int, criterion: str = "attention") -> torch.Tensor:
    """(kv_heads, r) frequency pairs kept with RoPE per KV head, the largest score first, summed over the
    KV head's query heads: ``norm`` mean‖q‖·mean‖k‖ (MHA2MLA), ``attention`` the attention-weighted
    score change that dropping the pair's RoPE causes (``rope_removal_error``)."""
    kv_heads, pairs = stats.k_pair_norm.shape
    if criterion == "norm":
        q = (stats.q_pair_norm / stats.tokens).view(kv_heads, -1, pairs)  # (kv_heads, group, pairs)
        score = q.sum(1) * (stats.k_pair_norm / stats.tokens)  # (kv_heads, pairs)
    else:
        score = stats.pair_error.view(kv_heads, -1, pairs).sum(1)  # (kv_heads, pairs)
    return score.topk(rope_pairs, dim=-1).indices.sort(-1).values


def stacked_rows(view: AttentionView, nope_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[W_k rows of the no-RoPE channels; all W_v rows] (m, hidden) float64, and the same rows' biases."""
    hd, kv = view.head_dim, view.num_kv_heads
    rows = (torch.arange(kv)[:, None] * hd + nope_index.cpu()).flatten()  # (kv_heads * nope,)
    weight = torch.cat([view.k_proj.weight.detach()[rows], view.v_proj.weight.detach()]).double().cpu()
    bias = None
    if view.k_proj.bias is not None:
        bias = torch.cat([view.k_proj.bias.detach()[rows], view.v_proj.bias.detach()]).double().cpu()
    return weight, bias


def row_weights(view: AttentionView, stats: LayerStats, nope_index: torch.Tensor, weighting: str) -> torch.Tensor:
    """(m,) importance of each stacked row (see the module doc); ones for ``weighting="none"``."""
    kv, hd = view.num_kv_heads, view.head_dim
    nope = nope_index.shape[-1]
    if weighting == "none":
        return torch.ones(kv * (nope + hd), dtype=torch.float64)
    q_rms = (stats.q_square / stats.tokens).view(kv, -1, hd).sum(1).sqrt()  # (kv_heads, head_dim)
    key_w = q_rms.gather(1, nope_index.cpu()) * view.scaling  # (kv_heads, nope)
    o_cols = view.o_proj.weight.detach().double().cpu().norm(dim=0) ** 2  # (heads * head_dim,)
    value_w = o_cols.view(kv, -1, hd).sum(1).sqrt()  # (kv_heads, head_dim)
    weights = torch.cat([key_w.flatten(), value_w.flatten()])
    return weights.clamp(min=weights.mean() * 1e-3)


@dataclass
class Factorization:
    """W (weighted) L = U S Vh for one layer, kept so any rank can be cut from it."""

    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, hidden)
    chol: torch.Tensor  # (hidden, hidden) lower-triangular L, C = L L^T
    weights: torch.Tensor  # (m,) row weights

    def energy(self) -> torch.Tensor:
        """Share of the weighted, whitened squared error each singular direction removes."""
        return self.s**2 / (self.s**2).sum().clamp(min=1e-30)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """up (m, rank), down (rank, hidden) with up @ down ≈ W on the calibration inputs."""
        up = self.u[:, :rank] / self.weights[:, None]
        scaled = self.s[:rank, None] * self.vh[:rank]  # (rank, hidden)
        down = torch.linalg.solve_triangular(self.chol.T, scaled.T, upper=True).T  # S V^T L^{-1}
        return up, down


def whitened_svd(weight: torch.Tensor, stats: LayerStats, weights: torch.Tensor, damping: float) -> Factorization:
    """Factor ``weight`` (m, hidden) float64 in the metric of the calibration inputs (see the module doc)."""
    cov = stats.xtx / max(stats.tokens, 1)
    cov = cov + damping * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    chol = torch.linalg.cholesky(cov)
    u, s, vh = torch.linalg.svd((weights[:, None] * weight) @ chol, full_matrices=False)
    return Factorization(u, s, vh, chol, weights)


def allocate_ranks(factorizations: list[Factorization], total: int, max_ranks: list[int]) -> list[int]:
    """Split ``total`` latent channels over layers by the largest normalized singular energies (≥ 1 each)."""
    ranks = [1] * len(factorizations)
    candidates = [(float(f.energy()[k]), layer, k) for layer, f in enumerate(factorizations)
                  for k in range(1, min(max_ranks[layer], f.s.numel()))]
    for _, layer, _ in sorted(candidates, reverse=True)[: max(total - len(ranks), 0)]:
        ranks[layer] += 1
    return ranks
