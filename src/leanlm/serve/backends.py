"""Where the scheduler's sequences keep their K/V, and how one step runs them.

- ``SlotBackend`` (full cache): one ``SlotCache`` row per running sequence; every decode step is ONE
  batched forward over all decoding rows, each at its own position (``engine.slot_forward``).
- ``PolicyBackend`` (``--kv-cache quantized`` ...): a leanlm policy cache decodes equal-length,
  unpadded batches only, and sequences that join at any step never have equal lengths; so each
  sequence gets its own policy cache and runs at batch 1 (one forward per sequence per step, its
  policy's hooks installed around its own forward). Continuous scheduling still holds (join/leave at
  every step, chunked prefill), but the step's cost grows with the number of sequences.
"""

from __future__ import annotations

import torch

from leanlm.engine.decode import forward, start_state
from leanlm.engine.slot_cache import SlotCache, slot_forward
from leanlm.engine.streaming_linear import enable_streaming_linears
from leanlm.errors import LeanLMError


def bytes_per_token(config, dtype: torch.dtype) -> int:
    """Full K/V bytes one token takes in every layer (from the config: uniform layers assumed)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotBackend:
    """Sequences in rows of one preallocated ``SlotCache``; admission = a free row."""

    batched = True

    def __init__(self, model, slots: int, max_len: int, max_cache_bytes: int | None = None):
        enable_streaming_linears(model)  # decode steps of bf16 CPU weights through leanlm's kernel
        per_token = bytes_per_token(model.config, next(model.parameters()).dtype)
        if max_cache_bytes is not None:
            fit = max_cache_bytes // (per_token * max_len)
            if fit < 1:
                raise LeanLMError(f"--max-cache-bytes {max_cache_bytes} cannot hold one sequence of --max-len "
                                  f"{max_len} tokens ({per_token * max_len} bytes); raise it or lower --max-len")
            slots = min(slots, fit)
        self.model, self.slots = model, slots
        self.cache = SlotCache(model.config, slots, max_len)
        self.capacity_bytes = slots * max_len * per_token
        self.free = list(range(slots))

    def admit(self, seq) -> bool:
        if not self.free:
            return False
        seq.slot = self.free.pop(0)  # the lowest free row keeps running rows contiguous more often
        return True

    def release(self, seq) -> None:
        if seq.slot is not None:
            self.free.append(seq.slot)
            self.free.sort()
            seq.slot = None

    def prefill(self, seq, ids: torch.Tensor, start: int) -> torch.Tensor:
        """(1, chunk) prompt ids at ``start`` → (1, vocab) logits of the chunk's last position."""
        return slot_forward(self.model, self.cache, ids, [seq.slot], [start])[:, -1]

    def decode(self, seqs: list, tokens: torch.Tensor) -> torch.Tensor:
        """(n,) last tokens of ``seqs`` → (n, vocab) next-token logits, in one batched forward."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].slot)  # ascending rows: a view when contiguous
        rows = [seqs[i].slot for i in order]
        starts = [seqs[i].position - 1 for i in order]  # the fed token sits one before the next position
        logits = slot_forward(self.model, self.cache, tokens[order][:, None], rows, starts)[:, -1]  # (n, vocab)
        return logits[torch.argsort(torch.tensor(order))]  # back to the callers' order

    def held_bytes(self) -> int:
        return self.cache.nbytes()


class PolicyBackend:
    """One policy cache per sequence, run at batch 1; admission against ``max_cache_bytes`` (nominal)."""

    batched = False

    def __init__(self, model, policy, budget: float, max_cache_bytes: int | None = None):
        from leanlm.kvcache import hooked, new_cache

        self.model, self.policy, self.budget = model, policy, budget
        enable_streaming_linears(model)
        self._hooked, self._new_cache = hooked, new_cache
        self.per_token = bytes_per_token(model.config, next(model.parameters()).dtype)
        self.capacity_bytes = max_cache_bytes or 0  # 0: no cap
        self.reserved = 0
        self.live: set = set()

    def reservation(self, seq) -> int:
        """Bytes a sequence may come to hold: the budget's fraction of its full cache (the policy's nominal size)."""
        return int(self.budget * self.per_token * (len(seq.prompt) + seq.max_tokens))

    def admit(self, seq) -> bool:
        need = self.reservation(seq)
        if self.capacity_bytes and self.live and self.reserved + need > self.capacity_bytes:
            return False
        total = len(seq.prompt) + seq.max_tokens
        seq.state = start_state(self.model, torch.tensor([seq.prompt]), None, self._new_cache(self.model, self.policy),
                                total)
        self.reserved += need
        self.live.add(seq)
        return True

    def release(self, seq) -> None:
        if seq in self.live:
            self.live.discard(seq)
            self.reserved -= self.reservation(seq)
            seq.state = None

    def _forward(self, seq, ids: torch.Tensor) -> torch.Tensor:
        with self._hooked(self.model, self.policy, seq.state.cache):
            return forward(self.model, ids, seq.state)[:, -1]  # (1, vocab)

    def prefill(self, seq, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self._forward(seq, ids)

    def decode(self, seqs: list, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._forward(seq, tokens[i: i + 1, None]) for i, seq in enumerate(seqs)])

    def held_bytes(self) -> int:
        return sum(seq.state.cache.nbytes() for seq in self.live if seq.state is not None)
