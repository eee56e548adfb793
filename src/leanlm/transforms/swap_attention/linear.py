"""Gated linear attention with a small sliding-window branch, built from the layer's own weights.

Per KV head h the layer keeps a state S_h (features x (head_dim + 1)): the sum over past tokens of
φ(k_j) [v_j, 1]^T, each step first multiplied by a scalar gate γ_t in (0, 1):

    S_t = γ_t S_{t-1} + φ(k_t) [v_t, 1]^T        linear_out_t = (φ(q_t) S_t)[:d] / (φ(q_t) S_t)[d]

(the last column is the normaliser, so the output is a weighted mean of values like softmax's). The
query heads of a GQA group read their KV head's state. The layer's output mixes this with softmax
attention over ``sink`` first + ``window`` last tokens (Liger / Jet style; a per-head learned weight):

    out = σ(m_h) · window_attention + (1 - σ(m_h)) · linear_out

Initialisation from the layer (LoLCATs / Liger): q, k, v, o are the original projections (RoPE
included); the feature maps are Hedgehog's φ(x) = [softmax(xW), softmax(-xW)] (2·head_dim features,
W = identity at the start; ``feature_map="elu"``: elu(xW) + 1, head_dim features) applied to q and k
scaled by sqrt(attention scale); the gate is computed from the layer's own pre-RoPE key,
γ_t = sigmoid(w_h · k_t + b_h) (w = 0, b = 5: γ ≈ 0.993 at the start), with no new projection.
New parameters (trained by the layer-local fit and KD): the two feature maps, the gate and the mix.

Two forms of the same recurrence, in plain torch: ``chunked`` (prefill: inside a chunk a masked
decay-weighted product, between chunks the state) and ``recurrent`` (decode: one token at a time).
They agree to float32 rounding (tested). The cache (``kvcache.swapped.RecurrentLayer``) holds the
window's K/V and the float32 state: constant in the sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leanlm.errors import LeanLMError
from leanlm.kvcache.swapped import RecurrentLayer
from leanlm.transforms.swap_attention.base import ReplacementSettings, SwappedAttention, register_replacement
from leanlm.transforms.swap_attention.sliding_window import local_kv, windowed_attention

FEATURE_MAPS = ("hedgehog", "elu")
EPS = 1e-6


@dataclass
class LinearSettings(ReplacementSettings):
    sink: int = 4
    window: int = 64
    chunk: int = field(default=64, metadata={"help": "tokens per chunk of the parallel (prefill) form"})
    feature_map: str = field(default="hedgehog", metadata={"help": "hedgehog | elu"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 1:
            raise LeanLMError(f"linear attention needs chunk >= 1, got {self.chunk}")
        if self.feature_map not in FEATURE_MAPS:
            raise LeanLMError(f"unknown feature map '{self.feature_map}': choose one of {', '.join(FEATURE_MAPS)}")


def feature(x: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """φ(x) for x (b, heads, n, d) with one (d, d) map per head -> (b, heads, n, f)."""
    proj = torch.einsum("bhnd,hde->bhne", x, weight)
    if kind == "elu":
        return F.elu(proj) + 1
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1)


def chunked(fq, fk, v, log_gate, state, chunk: int):
    """Parallel form. fq (b, kv, g, n, f); fk (b, kv, n, f); v (b, kv, n, e); log_gate (b, kv, n);
    state (b, kv, f, e) -> outputs (b, kv, g, n, e) and the state after the last token."""
    outs = []
    for start in range(0, fq.shape[-2], chunk):
        end = min(fq.shape[-2], start + chunk)
        q, k, vv, cum = fq[..., start:end, :], fk[:, :, start:end], v[:, :, start:end], log_gate[:, :, start:end].cumsum(-1)
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (b, kv, c, c)
        scores = torch.einsum("bhgif,bhjf->bhgij", q, k) * decay[:, :, None]  # (b, kv, g, c, c)
        out = scores @ vv[:, :, None]  # (b, kv, g, c, e)
        out = out + torch.einsum("bhgif,bhfe->bhgie", q, state) * cum.exp()[:, :, None, :, None]
        to_end = (cum[..., -1:] - cum).exp()  # (b, kv, c): decay from each token to the chunk's end
        state = state * cum[..., -1].exp()[..., None, None] + torch.einsum("bhjf,bhj,bhje->bhfe", k, to_end, vv)
        outs.append(out)
    return torch.cat(outs, -2), state


def recurrent(fq, fk, v, log_gate, state):
    """Recurrent form, one token at a time; same arguments and results as ``chunked``."""
    outs = []
    for t in range(fq.shape[-2]):
        state = state * log_gate[:, :, t].exp()[..., None, None] + torch.einsum("bhf,bhe->bhfe", fk[:, :, t], v[:, :, t])
        outs.append(torch.einsum("bhgf,bhfe->bhge", fq[:, :, :, t], state))  # (b, kv, g, e)
    return torch.stack(outs, -2), state


@register_replacement
class LinearAttention(SwappedAttention):
    kind: ClassVar[str] = "linear"
    trains: ClassVar[bool] = True
    Settings: ClassVar[type[ReplacementSettings]] = LinearSettings

    def __init__(self, original: nn.Module, config, index: int, settings: LinearSettings):
        super().__init__(original, config, index, settings)
        view = self.view()
        heads, kv_heads, d = view.num_heads, view.num_kv_heads, self.head_dim
        eye = torch.eye(d)
        self.feature_q = nn.Parameter(eye.repeat(heads, 1, 1))  # (heads, d, d)
        self.feature_k = nn.Parameter(eye.repeat(kv_heads, 1, 1))  # (kv_heads, d, d)
        self.gate_w = nn.Parameter(torch.zeros(kv_heads, d))
        self.gate_b = nn.Parameter(torch.full((kv_heads,), 5.0))
        self.mix = nn.Parameter(torch.full((heads,), 2.0))  # σ(2) = 0.88 on the window branch before any fit

    def attend(self, hidden, position_embeddings, cache) -> torch.Tensor:
        view, s = self.view(), self.settings
        queries = view.rotated_queries(hidden, position_embeddings)  # (b, h, n, d)
        raw_keys = view._heads(view.k_proj, view.k_norm, hidden)  # (b, kv, n, d), before RoPE
        values = view._heads(view.v_proj, None, hidden)  # (b, kv, n, d)
        cos, sin = position_embeddings
        keys, _ = apply_rotary_pos_emb(raw_keys, raw_keys, cos, sin)
        kv_keys, kv_values, key_pos, query_pos, layer = local_kv(self, cache, keys, values,
                                                                  lambda: RecurrentLayer(s.sink, s.window))
        local = windowed_attention(queries, kv_keys, kv_values, query_pos, key_pos, s.sink, s.window, self.scaling)
        state = None if layer is None else layer.state
        linear, state = self.linear_branch(queries, keys, values, raw_keys, state)
        if layer is not None:
            layer.state = state.detach()
        weight = torch.sigmoid(self.mix.float())[None, :, None, None]  # (1, h, 1, 1)
        out = weight * local.float() + (1 - weight) * linear  # (b, h, n, d)
        return out.to(hidden.dtype).transpose(1, 2).reshape(*hidden.shape[:-1], -1)

    def linear_branch(self, queries, keys, values, raw_keys, state):
        """(b, h, n, d) outputs of the gated linear attention, and the new state (b, kv, f, d + 1)."""
        b, heads, n, d = queries.shape
        kv_heads = keys.shape[1]
        root = self.scaling ** 0.5
        fq = feature(queries.float() * root, self.feature_q.float(), self.settings.feature_map)  # (b, h, n, f)
        fk = feature(keys.float() * root, self.feature_k.float(), self.settings.feature_map)  # (b, kv, n, f)
        fq = fq.view(b, kv_heads, heads // kv_heads, n, -1)  # (b, kv, g, n, f): query heads of a group together
        v1 = torch.cat([values.float(), values.new_ones(*values.shape[:-1], 1, dtype=torch.float32)], -1)  # (b, kv, n, d + 1)
        log_gate = F.logsigmoid(torch.einsum("bhnd,hd->bhn", raw_keys.float(), self.gate_w.float())
                                + self.gate_b.float()[None, :, None])  # (b, kv, n)
        if state is None:
            state = fq.new_zeros(b, kv_heads, fk.shape[-1], d + 1)
        if n == 1:
            out, state = recurrent(fq, fk, v1, log_gate, state)
        else:
            out, state = chunked(fq, fk, v1, log_gate, state, self.settings.chunk)
        out = out[..., :d] / (out[..., d:] + EPS)  # (b, kv, g, n, d)
        return out.reshape(b, heads, n, d), state


__all__ = ["FEATURE_MAPS", "LinearAttention", "LinearSettings", "chunked", "recurrent"]
