"""Attention computed on quantized K/V codes, never materialising a dequantized copy of the cache.

With a group's ``scale`` s and ``low`` z, a value is ``code * s + z``, so the sums attention needs
come straight from the codes:

- keys quantized per channel (KIVI: groups of tokens, one s, z per channel and group g):
  ``q · k_t = sum_d (q_d s_dg) code_dt + sum_d q_d z_dg``;
- keys or values quantized per token (groups of channels): ``q · k_t = sum_g s_tg (q_g · code_tg) +
  z_tg sum(q_g)`` and ``sum_t p_t v_t = sum_t (p_t s_tg) code_tg + sum_t p_t z_tg``;
- a Hadamard rotation H (symmetric, H H = I) stored with the codes is applied to the query
  (``q · (k H) = (q H) · k``) or once to the output vector (``(p V H) = (p V) H``), not to the cache.

Every function here is plain torch on float32 accumulators; ``compiled(fn)`` wraps one with
``torch.compile`` (inductor's C++ backend fuses unpack, scale and the reduction into one loop, so
the codes are read once per step and no (tokens, head_dim) float tensor exists), falling back to
the eager function when compilation is unavailable. Shapes: b batch, h KV heads, n queries per KV
head (query heads of the group × query tokens), T tokens, d head_dim, G groups, j values per group.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from leanlm.kvcache.quant import planes, unpack

log = logging.getLogger(__name__)


def code_planes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Planes of codes (quant.pack's layout): each (..., bytes) uint8, in order along the group."""
    return [unpack(codes, bits)] if bits == 3 else planes(codes, bits)


def channel_key_logits(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """q (b, h, n, d) float32; per-channel codes (b, h, d, G, bytes) → logits (b, h, n, G * j)."""
    qs = (q.unsqueeze(-1) * scale.squeeze(-1).float().unsqueeze(2)).unsqueeze(-1)  # (b, h, n, d, G, 1)
    bias = (q.unsqueeze(-1) * low.squeeze(-1).float().unsqueeze(2)).sum(3).unsqueeze(-1)  # (b, h, n, G, 1)
    dots = [(qs * c.unsqueeze(2).float()).sum(3) + bias for c in code_planes(codes, bits)]  # each (b, h, n, G, j / k)
    return torch.cat(dots, -1).flatten(-2)


def token_key_logits(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """q (b, h, n, d) float32 (in the codes' basis); per-token codes (b, h, T, G, bytes) → (b, h, n, T)."""
    groups = codes.shape[3]
    qg = q.view(*q.shape[:3], 1, groups, -1)  # (b, h, n, 1, G, j)
    dots, start = 0, 0
    for c in code_planes(codes, bits):  # c (b, h, T, G, j / k): channels [start, start + j / k) of each group
        width = c.shape[-1]
        dots = dots + (qg[..., start:start + width] * c.unsqueeze(2).float()).sum(-1)  # (b, h, n, T, G)
        start += width
    s, z = scale.squeeze(-1).float().unsqueeze(2), low.squeeze(-1).float().unsqueeze(2)  # (b, h, 1, T, G)
    return (dots * s + qg.sum(-1) * z).sum(-1)


def token_value_sum(p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    """p (b, h, n, T) float32; per-token codes (b, h, T, G, bytes) → sum_t p_t v_t (b, h, n, G * j), codes' basis."""
    ps = (p.unsqueeze(-1) * scale.squeeze(-1).float().unsqueeze(2)).unsqueeze(-1)  # (b, h, n, T, G, 1)
    bias = (p.unsqueeze(-1) * low.squeeze(-1).float().unsqueeze(2)).sum(3).unsqueeze(-1)  # (b, h, n, G, 1)
    out = [(ps * c.unsqueeze(2).float()).sum(3) + bias for c in code_planes(codes, bits)]  # each (b, h, n, G, j / k)
    return torch.cat(out, -1).flatten(-2)


def dense_logits(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q (b, h, n, d) float32; keys (b, h, T, d) any float dtype → (b, h, n, T) float32."""
    return (q.unsqueeze(3) * keys.unsqueeze(2).float()).sum(-1)


def dense_value_sum(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """p (b, h, n, T) float32; values (b, h, T, d) → (b, h, n, d) float32."""
    return (p.unsqueeze(-1) * values.unsqueeze(2).float()).sum(3)


def quantized_attention(q: torch.Tensor, keys: tuple, values: tuple, rot: torch.Tensor | None, res_k: torch.Tensor,
                        res_v: torch.Tensor, bias: torch.Tensor | None, key_bits: int, value_bits: int,
                        keys_per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over quantized tokens followed by full-precision ones (the residual / new tokens).

    q (b, h, n, d) float32, already scaled (and rotated, for rotated per-token keys); keys/values:
    (codes, scale, low) of T tokens; ``rot``: the values' Hadamard matrix or None; res_k/res_v
    (b, h, R, d); bias None or additive (…, n, T + R). Returns (output (b, h, n, d) float32,
    probabilities (b, h, n, T + R)).
    """
    kernel = channel_key_logits if keys_per_channel else token_key_logits
    logits = torch.cat([kernel(q, *keys, key_bits), dense_logits(q, res_k)], -1)  # (b, h, n, T + R)
    if bias is not None:
        logits = logits + bias
    p = logits.softmax(-1)
    held = logits.shape[-1] - res_k.shape[2]
    out = token_value_sum(p[..., :held], *values, value_bits)  # (b, h, n, d) in the values' basis
    if rot is not None:
        out = out @ rot  # H is its own inverse
    return out + dense_value_sum(p[..., held:], res_v), p


def dense_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                    new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, h, n, d) float32 scaled; keys/values (b, h, T, d), then optionally new_k/new_v (b, h, R, d)
    → (output (b, h, n, d) float32, probabilities (b, h, n, T [+ R]))."""
    logits = dense_logits(q, keys)
    if new_k is not None:
        logits = torch.cat([logits, dense_logits(q, new_k)], -1)  # (b, h, n, T + R)
    if bias is not None:
        logits = logits + bias
    p = logits.softmax(-1)
    out = dense_value_sum(p[..., :keys.shape[2]], values)
    if new_v is not None:
        out = out + dense_value_sum(p[..., keys.shape[2]:], new_v)
    return out, p


_compiled: dict = {}
_failed: set = set()


def compile_enabled() -> bool:
    """``LEANLM_KV_COMPILE=0`` turns compilation off (eager fallback everywhere)."""
    return os.environ.get("LEANLM_KV_COMPILE", "1") != "0"


def run(fn, *args, **static):
    """``fn(*args, **static)`` through ``torch.compile`` (dynamic shapes; one graph per fn and ``static``
    settings, which are baked in), else eagerly when compilation is off or failed."""
    key = (fn, tuple(sorted(static.items())))
    if not compile_enabled() or key in _failed:
        return fn(*args, **static)
    if key not in _compiled:
        _compiled[key] = torch.compile(functools.partial(fn, **static), dynamic=True)
    try:
        return _compiled[key](*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, once, loudly
        log.warning("torch.compile of %s failed (%s); using eager torch", fn.__name__, str(err).splitlines()[0])
        _failed.add(key)
        return fn(*args, **static)
