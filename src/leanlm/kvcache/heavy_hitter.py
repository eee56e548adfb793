"""H2O (Zhang et al. 2023): keep the recent tokens and the "heavy hitters", the tokens that have
received the most attention so far.

Each step, the attention of the step's queries (captured by a hook, softmax over every held + new
token, causal within the step) is added to each token's running score, per KV head (summed over the
query heads that share it). Over capacity, the last ``recent`` tokens stay and the rest of the room
goes to the best-scored older tokens. The scores are policy state and count in ``nbytes``.

Two layers keep the same tokens: ``SlotHeavyHitterLayer`` (the default, ``inplace=True``) holds a
fixed slot buffer, attends over it with the fused kernels (which also give the step's attention for
the scores, so no query hook and no second attention pass) and evicts by overwriting one slot per
step; ``HeavyHitterLayer`` (``inplace=False``) is the straightforward reference: capture queries by a
hook, re-score, gather the kept tokens into new tensors every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from leanlm.errors import LeanLMError
from leanlm.kvcache import fused_kernels
from leanlm.kvcache.base import CachePolicy, PolicyLayer, check_budget, tensor_bytes
from leanlm.kvcache.eviction import EvictionLayer, attention_probs, gather_tokens, recent_and_top, tokens_for_budget
from leanlm.kvcache.fused import FusedLayer, causal_bias, install
from leanlm.kvcache.quant import hadamard
from leanlm.kvcache.slots import SlotStore


SCORE_BYTES = 4  # one float32 accumulated-attention score per held token and KV head


class HeavyHitterLayer(EvictionLayer):
    def __init__(self, capacity: int, recent: int, bits: int | None, group: int, rotate: bool = False):
        super().__init__(capacity, bits, group, rotate)
        self.recent = recent
        self.scores: torch.Tensor | None = None  # (batch, kv_heads, held) accumulated attention, float32

    def observe(self, keys: torch.Tensor, new: int) -> None:
        step = attention_probs(self.queries, keys, new)  # (batch, kv_heads, held + new)
        held = torch.zeros_like(step[..., :0]) if self.scores is None else self.scores
        self.scores = torch.cat([held, torch.zeros_like(step[..., -new:])], dim=-1) + step

    def keep(self, keys: torch.Tensor, new: int) -> torch.Tensor:
        return recent_and_top(self.scores, self.capacity, self.recent)

    def after_eviction(self, index: torch.Tensor) -> None:
        self.scores = gather_tokens(self.scores, index)

    def state_nbytes(self) -> int:
        return 0 if self.scores is None else self.scores.numel() * self.scores.element_size()


class SlotHeavyHitterLayer(FusedLayer, PolicyLayer):
    """H2O on a ``SlotStore``: the same tokens as ``HeavyHitterLayer``, evicted in place.

    Slots [0, capacity - recent) hold the older kept tokens; the last ``recent`` slots are a ring of
    the recent window, ``ring`` its oldest slot. A decode step attends over the codes
    (``fused_kernels``), adds its attention to the scores, and then the ring's oldest token either
    replaces the lowest-scored older token or is dropped, and the new token takes its ring slot —
    exactly H2O's rule (recent window + top older scores), as one token moves per step. Steps of
    several tokens (prefill) take the plain way: text order, ``recent_and_top``, refill.
    """

    def __init__(self, capacity: int, recent: int, bits: int | None, group: int, rotate: bool = False):
        super().__init__()
        self.capacity, self.recent = capacity, recent
        self.store_ = SlotStore(capacity, bits, group, rotate)
        self.scores: torch.Tensor | None = None  # (batch, kv_heads, capacity) accumulated attention, float32
        self.count = 0  # filled slots
        self.ring = capacity - recent  # slot of the oldest recent token (once full)
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's K/V until attend

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.fused:
            raise LeanLMError("heavy_hitter's in-place cache attends through leanlm's attention function: "
                              "attach it with leanlm.kvcache.attach(model, policy)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.store_.allocate(key_states)
            self.scores = torch.zeros(*key_states.shape[:2], self.capacity, device=key_states.device)
        self.new, self.pending = (key_states, value_states), True
        self.seen += key_states.shape[2]
        return key_states, value_states

    def attend(self, module: nn.Module, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        keys, values = self.new
        self.new, self.pending = None, False
        if keys.shape[2] == 1 and query.shape[2] == 1:
            return self._decode(query, keys, values, mask, scaling)
        return self._refill(module, query, keys, values, mask, scaling)

    def _decode(self, query, keys, values, mask, scaling) -> torch.Tensor:
        batch, heads, _, dim = query.shape
        kv_heads = keys.shape[1]
        q = query.float().view(batch, kv_heads, heads // kv_heads, dim) * scaling  # (b, h, group, d)
        bias = causal_bias(1, self.count + 1, mask, heads // kv_heads, query.device)
        held_k, held_v = self.store_.view(self.count)
        if self.store_.quantized:
            rot = hadamard(dim).to(query.device) if self.store_.rotate else None
            # rotated keys: q · (k H) = (q H) · k, so the query (and the new key, to match) go to the codes' basis
            q_basis, new_k = (q, keys) if rot is None else (q @ rot, keys.float() @ rot)
            out, p = fused_kernels.run(fused_kernels.quantized_attention, q_basis, held_k, held_v,
                                       rot, new_k, values, bias, key_bits=self.store_.bits,
                                       value_bits=self.store_.bits, keys_per_channel=False)
        else:
            out, p = fused_kernels.run(fused_kernels.dense_attention, q, held_k, held_v, bias, keys, values)
        self._evict_and_write(p.sum(2), keys, values)  # (b, h, count + 1): attention per token this step
        self.peak = max(self.peak, self.nbytes())
        return out.view(batch, heads, 1, dim).to(query.dtype)

    def _evict_and_write(self, step: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        count = self.count
        self.scores[..., :count] += step[..., :count]
        if count < self.capacity:  # still filling: slots are in text order
            slot, self.count = count, count + 1
        else:
            slot = self.ring  # the oldest recent token leaves the window: it competes with the older ones
            lowest, where = self.scores[..., :self.capacity - self.recent].min(-1)  # (b, h)
            dest = torch.where(self.scores[..., slot] < lowest, slot, where)  # (b, h): its new slot, or its own
            self.store_.move(slot, dest)
            self.scores.scatter_(2, dest.unsqueeze(-1), self.scores[..., slot:slot + 1].clone())
            self.ring = self.capacity - self.recent + (slot + 1 - (self.capacity - self.recent)) % self.recent
        self.store_.write(slot, keys, values)
        self.scores[..., slot] = step[..., count]

    def text_order(self) -> torch.Tensor:
        """Slots in text order, except that the older kept tokens come in slot order (H2O ignores it)."""
        device = self.scores.device
        if self.count < self.capacity:
            return torch.arange(self.count, device=device)
        older = self.capacity - self.recent
        ring = [older + (self.ring - older + i) % self.recent for i in range(self.recent)]
        return torch.cat([torch.arange(older, device=device), torch.tensor(ring, device=device)])

    def _refill(self, module, query, keys, values, mask, scaling) -> torch.Tensor:
        """Several new tokens: attend over text-ordered held + new, keep H2O's choice, refill the slots."""
        order = self.text_order()
        held = self.store_.ordered(order)
        held_k, held_v = self.store_.full_precision(held)
        full_k, full_v = torch.cat([held_k, keys], 2), torch.cat([held_v, values], 2)  # (b, h, total, d)
        stored = self.store_.extended(held, keys, values)  # as stored: the new tokens quantized, if the store is
        total, q_len = full_k.shape[2], query.shape[2]
        scores = torch.cat([self.scores[..., order], self.scores.new_zeros(*keys.shape[:2], keys.shape[2])], -1)
        scores += attention_probs(query, full_k, q_len)  # (b, h, total)
        index = recent_and_top(scores, self.capacity, self.recent) if total > self.capacity else \
            torch.arange(total, device=scores.device).expand(*scores.shape[:2], -1)
        kept_k, kept_v = self.store_.select(stored, index)
        self.store_.fill(kept_k, kept_v)
        self.scores[..., :index.shape[2]] = gather_tokens(scores, index)
        self.count, self.ring = index.shape[2], self.capacity - self.recent
        # transformers' own sdpa call, as a plain cache gets it (``module`` None: a direct call, e.g. seeding)
        if module is not None:
            out = sdpa_attention_forward(module, query, full_k, full_v, mask, scaling=scaling)[0].transpose(1, 2)
        else:
            out = F.scaled_dot_product_attention(query, full_k, full_v, attn_mask=mask, scale=scaling, enable_gqa=True,
                                                 is_causal=mask is None and q_len > 1)
        self.peak = max(self.peak, self.nbytes() + tensor_bytes(full_k, full_v))
        return out

    # PolicyLayer's plain-path methods: this layer always attends itself
    def materialize(self):
        raise LeanLMError("the in-place heavy_hitter cache is read through its attention, not materialized")

    def store(self, keys, values, new) -> None:
        raise LeanLMError("the in-place heavy_hitter cache stores through its attention")

    def held_tokens(self) -> int:
        return self.count

    def full_precision_tensors(self):
        return []

    def nbytes(self) -> int:
        return self.store_.nbytes() + tensor_bytes(self.scores)


@dataclass
class HeavyHitter(CachePolicy):
    """Recent window + top accumulated-attention tokens, ``capacity`` tokens in all."""

    name: ClassVar[str] = "heavy_hitter"
    capacity: int = 256
    recent_fraction: float = 0.5  # H2O's split: half recent, half heavy hitters
    bits: int | None = None
    group: int = 32
    rotate: bool = True  # with bits: quantize K/V after a Hadamard rotation of head_dim (quant.hadamard)
    inplace: bool = True  # a fixed slot buffer evicted in place + fused attention; False: the gather reference

    @property
    def needs_queries(self) -> bool:  # the in-place layer gets its queries from its attention function
        return not self.inplace

    def hooks(self, model: nn.Module, cache) -> list:
        return [install(model, cache)] if self.inplace else []

    def __post_init__(self):
        if self.capacity < 2 or not 0 < self.recent_fraction < 1:
            raise LeanLMError(f"heavy_hitter needs capacity >= 2 and 0 < recent_fraction < 1, got "
                              f"{self.capacity}, {self.recent_fraction}")

    def make_layer(self, layer_idx: int, model: nn.Module) -> PolicyLayer:
        recent = min(self.capacity - 1, max(1, round(self.capacity * self.recent_fraction)))
        layer = SlotHeavyHitterLayer if self.inplace else HeavyHitterLayer
        return layer(self.capacity, recent, self.bits, self.group, bool(self.rotate))

    @classmethod
    def for_budget(cls, budget: float, context: int, bits: int | None = None, head_dim: int | None = None,
                   **settings) -> HeavyHitter:
        check_budget(budget)
        group = settings.get("group", cls.group)
        # at a full budget nothing is evicted (the scores then come on top: the measured bytes say so)
        tokens = context if budget >= 1 and bits is None else \
            tokens_for_budget(budget, context, bits, group, head_dim, state_bytes=SCORE_BYTES)
        return cls(capacity=max(2, tokens), bits=bits, **settings)
