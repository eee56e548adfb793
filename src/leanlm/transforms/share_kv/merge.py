"""The weight math of merging the KV heads of one attention layer: ``r`` old KV heads -> 1 new one.

transformers lays GQA out as ``repeat_kv``: query head ``h`` reads KV head ``h // (heads / kv_heads)``.
Merging old KV heads ``j*r .. j*r + r - 1`` into new head ``j`` keeps that layout, so every query head
reads the merge of the head it read before. Shapes below: ``d`` head_dim, ``D`` attention input
width (``hidden``, or ``hidden + 1`` when biases ride along as a last column, see calibration.py).

- ``mean`` (the GQA paper's conversion): new k/v weights are the means of the merged heads'. The mean
  is taken as ``first + mean(others - first)``, so merging identical heads is exact in floating point.
- ``calibrated``: the merge that minimises the error of what attention reads, measured on calibration
  inputs through ``C = E[x x^T]`` (``S = C^(1/2)``), with the query and output projections absorbing
  what they can:
  * values: per query head ``h`` (old KV head ``g``) the layer adds ``O_h W_v[g] x`` to the output. A
    shared ``W_v'`` and new ``O_h'`` are the best rank-``d`` fit of all of them at once:
    ``W_v' = V^T S^-1`` and ``O_h' = O_h W_v[g] S V`` with ``V`` the top-``d`` eigenvectors of
    ``sum_g (W_v[g] S)^T (sum_h O_h^T O_h) (W_v[g] S)``. Exact when nothing is merged (r = 1).
  * keys: RoPE rotates each frequency pair ``(i, i + d/2)`` of a key as a complex number, so the only
    maps that commute with it are per-pair complex scalars (a rotation within the pair and a scale).
    Per pair, the old keys ``k_g`` are fitted as ``alpha_g * k'`` (the top singular pair of the
    ``r x D`` complex matrix of key rows, weighted by ``S`` and by each group's query energy on that
    pair), and the queries absorb ``conj(alpha_g)``: ``conj(q) k_g ~= conj(conj(alpha_g) q) k'`` at
    every relative position. Identical heads give ``alpha = 1``; r = 1 is exact.
  Families with per-head q/k norms (Gemma 3) normalise after the projection, which no per-head scalar
  passes through: there the keys are mean-merged and the values calibrated.
"""

from __future__ import annotations

import torch

from leanlm.models.arch import AttentionView
from leanlm.transforms.share_kv.calibration import augmented_weight, has_bias, set_augmented_weight


def shifted_mean(stack: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 as ``first + mean(stack - first)``: exactly ``first`` when all entries are equal."""
    return stack[0] + (stack - stack[0]).mean(0)


def mean_merge(view: AttentionView, kv_heads: int) -> None:
    """Merge each run of ``r = num_kv / kv_heads`` consecutive KV heads into their mean, in place."""
    augmented, d, r = has_bias(view), view.head_dim, view.num_kv_heads // kv_heads
    for proj in (view.k_proj, view.v_proj):
        weight = augmented_weight(proj, augmented).view(kv_heads, r, d, -1)  # (new_kv, r, d, D)
        merged = shifted_mean(weight.transpose(0, 1))  # (new_kv, d, D)
        set_augmented_weight(proj, merged.reshape(kv_heads * d, -1), augmented)
    view.set_group_size()


def root_and_inverse(moments: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(C, C^(1/2), C^(-1/2))`` of the damped moments ``C = E[x x^T] + damping * mean(diag) * I``."""
    size = moments.shape[0]
    damped = moments + damping * moments.diagonal().mean() * torch.eye(size, dtype=moments.dtype, device=moments.device)
    values, vectors = torch.linalg.eigh(damped)
    values = values.clamp_min(values.max() * 1e-12)
    root = (vectors * values.sqrt()) @ vectors.T  # (D, D)
    inverse = (vectors * values.rsqrt()) @ vectors.T  # (D, D)
    return damped, root, inverse


def calibrated_merge(view: AttentionView, kv_heads: int, moments: torch.Tensor, damping: float = 0.01) -> str:
    """Merge KV heads minimising the calibration error (see the module doc), in place.

    Returns how the keys were merged: ``"calibrated"``, or ``"mean"`` for a family with q/k norms.
    """
    augmented = has_bias(view)
    moments, root, inverse = root_and_inverse(moments, damping)
    _merge_values(view, kv_heads, root, inverse, augmented)
    if view.k_norm is not None:
        _mean_keys(view, kv_heads, augmented)
        keys = "mean"
    else:
        _merge_keys(view, kv_heads, moments, root, inverse, augmented)
        keys = "calibrated"
    view.set_group_size()
    return keys


def _mean_keys(view: AttentionView, kv_heads: int, augmented: bool) -> None:
    d, r = view.head_dim, view.num_kv_heads // kv_heads
    weight = augmented_weight(view.k_proj, augmented).view(kv_heads, r, d, -1)  # (new_kv, r, d, D)
    set_augmented_weight(view.k_proj, shifted_mean(weight.transpose(0, 1)).reshape(kv_heads * d, -1), augmented)


def _merge_values(view: AttentionView, kv_heads: int, root: torch.Tensor, inverse: torch.Tensor, augmented: bool) -> None:
    d, num_kv, heads = view.head_dim, view.num_kv_heads, view.num_heads
    r, per_kv = num_kv // kv_heads, heads // num_kv
    values = augmented_weight(view.v_proj, augmented).view(num_kv, d, -1)  # (kv, d, D)
    out = view.o_proj.weight.detach().double()
    out = out.view(out.shape[0], heads, d).transpose(0, 1)  # (heads, hidden, d)
    new_values, new_out = [], out.clone()
    for j in range(kv_heads):
        olds = range(j * r, (j + 1) * r)
        gram = 0
        for g in olds:
            o_heads = out[g * per_kv : (g + 1) * per_kv]  # (per_kv, hidden, d)
            reads = torch.einsum("qhd,qhe->de", o_heads, o_heads)  # (d, d): sum_h O_h^T O_h
            scaled = values[g] @ root  # (d, D)
            gram = gram + scaled.T @ reads @ scaled  # (D, D)
        basis = torch.linalg.eigh(gram).eigenvectors[:, -d:]  # (D, d): top-d directions
        new_values.append(basis.T @ inverse)  # (d, D)
        for g in olds:
            to_new = values[g] @ root @ basis  # (d, d): old value coordinates -> new ones
            new_out[g * per_kv : (g + 1) * per_kv] = out[g * per_kv : (g + 1) * per_kv] @ to_new
    set_augmented_weight(view.v_proj, torch.cat(new_values), augmented)
    o_weight = new_out.transpose(0, 1).reshape(out.shape[1], heads * d)  # (hidden, heads * d)
    view.o_proj.weight = torch.nn.Parameter(o_weight.to(view.o_proj.weight), requires_grad=view.o_proj.weight.requires_grad)


def _complex_pairs(weight: torch.Tensor, half: int) -> torch.Tensor:
    """(n, d, D) real rows -> (n, d/2, D) complex rows: pair i is ``row i + 1j * row (i + d/2)``."""
    return torch.complex(weight[:, :half], weight[:, half:])


def _merge_keys(view: AttentionView, kv_heads: int, moments: torch.Tensor, root: torch.Tensor,
                inverse: torch.Tensor, augmented: bool) -> None:
    d, num_kv, heads = view.head_dim, view.num_kv_heads, view.num_heads
    r, per_kv, half = num_kv // kv_heads, heads // num_kv, view.head_dim // 2
    keys = _complex_pairs(augmented_weight(view.k_proj, augmented).view(num_kv, d, -1), half)  # (kv, half, D)
    queries = augmented_weight(view.q_proj, augmented).view(heads, d, -1)  # (heads, d, D)
    energy = torch.einsum("hpi,ij,hpj->hp", queries, moments, queries)  # (heads, d): E[q^2] per row
    weight = (energy[:, :half] + energy[:, half:]).view(num_kv, per_kv, half).sum(1)  # (kv, half)
    weight = weight.clamp_min(weight.max() * 1e-12).sqrt()  # (kv, half)
    fitted = (keys @ root.to(keys.dtype)) * weight[..., None]  # (kv, half, D)
    fitted = fitted.view(kv_heads, r, half, -1).permute(0, 2, 1, 3)  # (new_kv, half, r, D)
    left, sigma, right = torch.linalg.svd(fitted, full_matrices=False)  # (new_kv, half, r, r), (.., r), (.., r, D)
    alpha = sigma[..., :1] * left[..., 0] / weight.view(kv_heads, r, half).transpose(1, 2)  # (new_kv, half, r)
    scale = alpha.abs().pow(2).mean(-1, keepdim=True).sqrt()  # (new_kv, half, 1)
    total = alpha.sum(-1, keepdim=True)
    phase = torch.where(total.abs() > 1e-12 * scale, total / total.abs(), alpha[..., :1] / alpha[..., :1].abs())
    scale = scale * phase  # alpha / scale: RMS 1, phases centred on the shared key
    alpha = alpha / scale  # (new_kv, half, r)
    shared = (scale * right[..., 0, :]) @ inverse.to(keys.dtype)  # (new_kv, half, D): k' per pair
    set_augmented_weight(view.k_proj, torch.cat([shared.real, shared.imag], dim=1).reshape(kv_heads * d, -1), augmented)
    per_head = alpha.permute(0, 2, 1).reshape(num_kv, half).repeat_interleave(per_kv, dim=0)  # (heads, half)
    absorbed = per_head.conj()[..., None] * _complex_pairs(queries, half)  # (heads, half, D)
    new_queries = torch.cat([absorbed.real, absorbed.imag], dim=1).reshape(heads * d, -1)  # (heads * d, D)
    set_augmented_weight(view.q_proj, new_queries, augmented)
