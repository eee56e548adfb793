"""A slot cache for continuous batching: one preallocated row per running sequence, each at its own length.

transformers' ``StaticCache`` writes every row at the same position, so all rows share one time axis
and a sequence cannot join or leave between steps. Here row ``r`` is a slot that one sequence owns
from admission to finish: slot position ``j`` holds that sequence's token at text position ``j`` (no
left padding, no shared clock). Before each forward the caller plans which rows run and where each
one starts (``plan``); every layer's ``update`` writes the new K/V in place at those positions and
returns the rows' first ``span`` slots (``span`` = the longest row after this step), so attention reads
only what the running sequences hold, not the whole preallocation. The mask is built here (4-D, per
row: query ``i`` of a row starting at ``s`` sees slots ``0 .. s + i``), so transformers takes it as is.

    cache = SlotCache(model.config, slots=8, max_len=2048)
    logits = slot_forward(model, cache, ids, rows=[0, 3], starts=[17, 5])  # (2, 1, vocab)

A freed row needs no clearing: the next owner's prefill overwrites it from position 0 and the mask
hides everything past its own length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from leanlm.errors import LeanLMError
from leanlm.models.compat import with_cache


@dataclass
class SlotPlan:
    """What the next forward writes: which rows, at which positions, and how many slots it attends to."""

    rows: torch.Tensor | slice  # (n,) row indices, or a slice when the rows are contiguous (a view, no gather)
    write: torch.Tensor  # (n, q) slot positions of the new tokens
    span: int  # slots attended to: max over rows of start + q


class SlotLayer(CacheLayerMixin):
    """One decoder layer's (slots, kv_heads, max_len, head_dim) K/V, written per row at its own positions."""

    is_compileable = False
    is_sliding = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.owner = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        shape = (self.owner.slots, key_states.shape[1], self.owner.max_len)
        self.keys = key_states.new_zeros(*shape, key_states.shape[-1])  # (slots, kv_heads, max_len, head_dim)
        self.values = value_states.new_zeros(*shape, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        plan = self.owner.plan_now
        rows = plan.rows
        index = torch.arange(self.keys.shape[0])[rows][:, None]  # (n, 1) absolute row ids
        # advanced indices on dims 0 and 2 put (n, q) first: assign (n, q, kv_heads, head_dim)
        self.keys[index, :, plan.write] = key_states.transpose(1, 2)
        self.values[index, :, plan.write] = value_states.transpose(1, 2)
        return self.keys[rows, :, : plan.span], self.values[rows, :, : plan.span]  # (n, kv_heads, span, head_dim)

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.owner.plan_now.span, 0

    def get_seq_length(self) -> int:
        return self.owner.plan_now.span if self.owner.plan_now is not None else 0

    def get_max_length(self) -> int:
        return self.owner.max_len


class SlotCache(Cache):
    """``slots`` rows of up to ``max_len`` tokens each, for every decoder layer of a model of ``config``."""

    def __init__(self, config, slots: int, max_len: int):
        if slots < 1 or max_len < 1:
            raise LeanLMError(f"a slot cache needs at least one slot and one token, got {slots} x {max_len}")
        self.slots, self.max_len = slots, max_len
        self.plan_now: SlotPlan | None = None
        self.window = _sliding_window(config)
        super().__init__(layers=[SlotLayer(self) for _ in range(config.num_hidden_layers)])

    def plan(self, rows: list[int], starts: list[int], q: int, device=None):
        """Set the next forward's rows → (position_ids (n, q), attention mask for the model)."""
        if len(rows) != len(starts) or not rows:
            raise LeanLMError("plan one start position per row, for at least one row")
        if max(starts) + q > self.max_len:
            raise LeanLMError(f"a slot holds {self.max_len} tokens; this step would reach {max(starts) + q}")
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        row_index = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows)
        start = torch.tensor(starts, device=device)[:, None]  # (n, 1)
        positions = start + torch.arange(q, device=device)  # (n, q)
        span = max(starts) + q
        self.plan_now = SlotPlan(row_index, positions.cpu(), span)
        slots = torch.arange(span, device=device)  # (span,)
        causal = slots[None, None, :] <= positions[:, :, None]  # (n, q, span)
        mask = causal[:, None]  # (n, 1, q, span) True = attend
        if self.window is None:
            return positions, mask
        near = slots[None, None, :] > positions[:, :, None] - self.window  # (n, q, span)
        return positions, {"full_attention": mask, "sliding_attention": (causal & near)[:, None]}

    def nbytes(self) -> int:
        """Bytes of K/V this cache holds: its whole preallocation once the first forward has run."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))


def _sliding_window(config) -> int | None:
    types = getattr(config, "layer_types", None) or []
    return getattr(config, "sliding_window", None) if "sliding_attention" in types else None


def slot_forward(model, cache: SlotCache, ids: torch.Tensor, rows: list[int], starts: list[int],
                 keep: int = 1) -> torch.Tensor:
    """One eager forward of ``ids`` (n, q) for rows ``rows`` starting at ``starts`` → (n, keep, vocab) logits."""
    position_ids, mask = cache.plan(rows, starts, ids.shape[1], ids.device)
    out = model(ids, **with_cache(cache), position_ids=position_ids, attention_mask=mask, use_cache=True,
                logits_to_keep=keep)
    return out.logits
