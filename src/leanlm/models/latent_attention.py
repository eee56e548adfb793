"""MLA-style attention with a joint K/V latent and partial RoPE, for the Llama layout (Llama, Qwen2).

Built by ``leanlm.transforms.latent_kv`` from a trained attention module; it takes the module's place
(``decoder_layer.self_attn``) and keeps its ``q_proj`` / ``o_proj``. Per KV head g, ``rope_index[g]``
lists 2r of its head_dim channels (r frequency pairs: channel p and p + head_dim/2, as transformers'
``rotate_half`` pairs them) that keep RoPE; the other head_dim − 2r key channels ("nope") and all of
the values come from one latent per token::

    c      = kv_down(x)                       (batch, seq, rank)          <- cached
    k_rope = RoPE(k_rope(x))                  (batch, kv_heads, seq, 2r)  <- cached
    k_nope = k_up(c),  v = v_up(c)            expanded only in prefill

Scores are q_rope·k_rope + q_nope·k_nope (a permutation of the original channels, so with every pair
kept and a full-rank latent the module equals the original). Decode *absorbs* the up-projections:
q_nope·(W_uk c) = (q_nope W_uk)·c and attn·(W_uv c) = W_uv (attn·c), so a step reads the cached
latents once per head and never rebuilds K/V for the whole cache (``absorb``: "auto" absorbs when a
step has one query, "always"/"never" force a path; the tests compare them).

The cache receives ``update(latent, rope_keys)``: a transformers ``DynamicLayer`` or
``leanlm.kvcache.latent.LatentLayer`` (see there) hold exactly these two tensors.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from leanlm.errors import LeanLMError

ABSORB_MODES = ("auto", "always", "never")
LATENT_KEY = "leanlm_latent_kv"  # config key: {"rank_per_layer": [...], "rope_pairs": r}


class LatentAttention(nn.Module):
    """Attention over a cached joint K/V latent plus a few RoPE key channels (see the module doc)."""

    def __init__(self, config, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, rank: int,
                 rope_pairs: int, scaling: float, qkv_bias: bool = False, o_bias: bool = False):
        super().__init__()
        check_latent_shape(rank, rope_pairs, head_dim)
        hidden = config.hidden_size
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_key_value_groups = num_heads // num_kv_heads
        self.latent_rank, self.rope_pairs, self.scaling = rank, rope_pairs, scaling
        self.absorb = "auto"
        rope, nope = 2 * rope_pairs, head_dim - 2 * rope_pairs
        with warnings.catch_warnings():  # a Linear with no rows (all pairs RoPE, or none) warns at init
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self._make_linears(hidden, rank, rope, nope, qkv_bias, o_bias)
        pairs = torch.arange(rope_pairs).expand(num_kv_heads, -1)
        self.register_buffer("rope_index", rope_channels(pairs, head_dim))  # (kv_heads, 2r)
        self.register_buffer("nope_index", nope_channels(self.rope_index, head_dim))  # (kv_heads, head_dim - 2r)

    def _make_linears(self, hidden: int, rank: int, rope: int, nope: int, qkv_bias: bool, o_bias: bool) -> None:
        num_heads, num_kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=o_bias)
        self.k_rope = nn.Linear(hidden, num_kv_heads * rope, bias=qkv_bias)
        self.kv_down = nn.Linear(hidden, rank, bias=False)
        self.k_up = nn.Linear(rank, num_kv_heads * nope, bias=qkv_bias)
        self.v_up = nn.Linear(rank, num_kv_heads * head_dim, bias=qkv_bias)

    def set_rope_pairs(self, pairs: torch.Tensor) -> None:
        """(kv_heads, r) frequency-pair numbers in [0, head_dim/2) that keep RoPE, per KV head."""
        self.rope_index.copy_(rope_channels(pairs, self.head_dim))
        self.nope_index.copy_(nope_channels(self.rope_index, self.head_dim))

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        batch, q_len, _ = hidden_states.shape
        queries = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim).transpose(1, 2)  # (batch, heads, q, head_dim)
        cos, sin = self._rope_tables(*position_embeddings)  # (batch, kv_heads, q, 2r) each
        q_rope, q_nope = self._split_queries(queries)  # (batch, heads, q, 2r), (batch, heads, q, nope)
        group = self.num_key_value_groups
        q_rope = q_rope * cos.repeat_interleave(group, 1) + rotate_half(q_rope) * sin.repeat_interleave(group, 1)
        latent = self.kv_down(hidden_states)  # (batch, q, rank)
        k_rope = self.k_rope(hidden_states).view(batch, q_len, self.num_kv_heads, -1).transpose(1, 2)  # (batch, kv_heads, q, 2r)
        k_rope = k_rope * cos + rotate_half(k_rope) * sin
        if cache is not None:
            check_cache_layer(cache, self.layer_idx)
            latent, k_rope = cache.update(latent, k_rope, self.layer_idx)  # (batch, total, rank), (batch, kv_heads, total, 2r)
        mask = attention_bool_mask(attention_mask, q_len, latent.shape[1], hidden_states.device)
        absorbed = self.absorb == "always" or (self.absorb == "auto" and q_len == 1)
        attend = self._attend_absorbed if absorbed else self._attend_expanded
        out = attend(q_rope, q_nope, latent, k_rope, mask)  # (batch, heads, q, head_dim)
        out = out.transpose(1, 2).reshape(batch, q_len, -1)
        return self.o_proj(out), None

    def _rope_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, q, head_dim) RoPE tables → the RoPE channels of each KV head, (batch, kv_heads, q, 2r)."""
        index = self.rope_index  # (kv_heads, 2r)
        return cos[..., index].transpose(1, 2), sin[..., index].transpose(1, 2)

    def _split_queries(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.num_key_value_groups
        batch, heads, q_len, _ = queries.shape
        rope = self.rope_index.repeat_interleave(group, 0)[None, :, None, :].expand(batch, heads, q_len, -1)
        nope = self.nope_index.repeat_interleave(group, 0)[None, :, None, :].expand(batch, heads, q_len, -1)
        return queries.gather(-1, rope), queries.gather(-1, nope)

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (batch, seq, rank) → no-RoPE keys (batch, kv_heads, seq, nope), values (batch, kv_heads, seq, head_dim)."""
        batch, seq, _ = latent.shape
        k_nope = self.k_up(latent).view(batch, seq, self.num_kv_heads, -1).transpose(1, 2)
        values = self.v_up(latent).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return k_nope, values

    def _attend_expanded(self, q_rope, q_nope, latent, k_rope, mask) -> torch.Tensor:
        """Re-expand K/V of every held token, then sdpa (prefill: its cost is shared by many queries)."""
        k_nope, values = self.expand(latent)
        keys = torch.cat([k_rope, k_nope], dim=-1)  # (batch, kv_heads, total, head_dim), channels permuted like the queries
        queries = torch.cat([q_rope, q_nope], dim=-1)  # (batch, heads, q, head_dim)
        return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scaling,
                                              enable_gqa=self.num_key_value_groups > 1)

    def _attend_absorbed(self, q_rope, q_nope, latent, k_rope, mask) -> torch.Tensor:
        """Attend over the cached latents directly: W_uk goes into the query, W_uv after the weighted sum."""
        batch, heads, q_len, _ = q_rope.shape
        kv, group = self.num_kv_heads, self.num_key_value_groups
        w_uk = self.k_up.weight.view(kv, -1, self.latent_rank)  # (kv_heads, nope, rank)
        w_uv = self.v_up.weight.view(kv, self.head_dim, self.latent_rank)  # (kv_heads, head_dim, rank)
        q_nope = q_nope.reshape(batch, kv, group * q_len, -1)  # (batch, kv_heads, group * q, nope)
        q_latent = torch.einsum("bkqd,kdr->bkqr", q_nope, w_uk)  # (batch, kv_heads, group * q, rank)
        # k_up's bias adds q·b to every key's score alike: softmax ignores it.
        scores = q_latent @ latent.transpose(1, 2)[:, None]  # (batch, kv_heads, group * q, total)
        scores = scores + q_rope.reshape(batch, kv, group * q_len, -1) @ k_rope.transpose(-1, -2)
        scores = scores.view(batch, kv, group, q_len, -1).float() * self.scaling
        if mask is not None:
            scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # mask (batch or 1, 1, q, total)
        probs = scores.softmax(-1).to(latent.dtype).view(batch, kv, group * q_len, -1)
        context = probs @ latent[:, None]  # (batch, kv_heads, group * q, rank)
        out = torch.einsum("bkqr,kdr->bkqd", context, w_uv)  # (batch, kv_heads, group * q, head_dim)
        if self.v_up.bias is not None:
            out = out + self.v_up.bias.view(kv, 1, self.head_dim)  # the weights sum to one
        return out.reshape(batch, heads, q_len, self.head_dim)


def rope_channels(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(kv_heads, r) sorted pair numbers → (kv_heads, 2r) channels [p_1..p_r, p_1+h/2..p_r+h/2]."""
    pairs = pairs.sort(-1).values.long()
    return torch.cat([pairs, pairs + head_dim // 2], dim=-1)


def nope_channels(rope_index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The channels of each KV head not in ``rope_index``, ascending: (kv_heads, head_dim - 2r)."""
    keep = torch.ones(rope_index.shape[0], head_dim, dtype=torch.bool, device=rope_index.device)
    keep.scatter_(1, rope_index, False)
    return torch.stack([row.nonzero().flatten() for row in keep])


def check_latent_shape(rank: int, rope_pairs: int, head_dim: int) -> None:
    """One clear error for settings a latent layer cannot have."""
    if rank < 1:
        raise LeanLMError(f"the latent rank must be at least 1, got {rank}")
    if not 0 <= rope_pairs <= head_dim // 2:
        raise LeanLMError(f"rope_pairs must be in [0, {head_dim // 2}] (head_dim {head_dim} has {head_dim // 2} "
                          f"frequency pairs), got {rope_pairs}")


def check_cache_layer(cache, layer_idx: int) -> None:
    """A latent layer's cache must append and keep what it is given (see kvcache.latent.cache_layer_ok)."""
    from leanlm.kvcache.latent import cache_layer_ok  # lazy: kvcache imports models

    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) <= layer_idx:
        return  # a DynamicCache without config appends a DynamicLayer on first use
    if not cache_layer_ok(layers[layer_idx]):
        raise LeanLMError(f"a latent-KV model caches its latent in a dynamic or LatentCache layer, not in "
                          f"{type(layers[layer_idx]).__name__} (static caches and KV policies are not supported)")


def attention_bool_mask(mask: torch.Tensor | None, q_len: int, total: int, device) -> torch.Tensor | None:
    """transformers' attention mask (bool, additive float or None) → bool (batch or 1, 1, q, total), True = attend."""
    if mask is None:
        if q_len == 1:
            return None
        keys = torch.arange(total, device=device)
        queries = total - q_len + torch.arange(q_len, device=device)
        return (keys[None, :] <= queries[:, None])[None, None]  # causal, after total - q_len held tokens
    mask = mask[..., -total:]
    return mask if mask.dtype == torch.bool else mask == 0


def install_latent_shells(model: nn.Module) -> None:
    """Before loading a saved latent model: put an (uninitialised) ``LatentAttention`` of the recorded
    rank and RoPE pairs in place of each layer's attention (the weights and ``rope_index`` come next)."""
    from leanlm.models.arch import arch_of

    record = getattr(model.config, LATENT_KEY)
    arch = arch_of(model)
    ranks = record["rank_per_layer"]
    if len(ranks) != len(arch.layers):
        raise LeanLMError(f"the latent-KV config lists {len(ranks)} ranks for {len(arch.layers)} layers")
    for view, rank in zip(arch.attentions(), ranks):
        shell = LatentAttention(view.config, view.index, view.num_heads, view.num_kv_heads, view.head_dim, rank,
                                record["rope_pairs"], view.scaling, qkv_bias=view.k_proj.bias is not None,
                                o_bias=view.o_proj.bias is not None)
        setattr(arch.layers[view.index], arch.family.attention, shell.to(view.q_proj.weight.dtype))


def latent_layers(model: nn.Module) -> list[tuple[int, LatentAttention]]:
    """(layer index, module) of every latent attention module of ``model``."""
    return [(i, m) for i, m in enumerate(getattr(layer, "self_attn", None) for layer in model.model.layers)
            if isinstance(m, LatentAttention)]


__all__ = ["ABSORB_MODES", "LATENT_KEY", "install_latent_shells", "LatentAttention", "attention_bool_mask", "check_latent_shape", "latent_layers",
           "nope_channels", "rope_channels"]
