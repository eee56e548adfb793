"""What the eviction policies share: a token store (full precision or quantized) and a keep rule.

An ``EvictionLayer`` holds at most ``capacity`` tokens per KV head. After each step it asks its
subclass which tokens to keep (``keep``: indices per KV head, ascending) and really drops the rest:
the store's tensors are re-allocated at the kept size, so ``nbytes`` shrinks.

Stores: ``FullStore`` keeps K/V as computed; ``QuantStore`` keeps each token's K and V quantized along
head_dim (per token, so tokens can be dropped one by one) — eviction + quantization in one policy.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
import torch

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import PolicyLayer, tensor_bytes
from leanlm.kvcache.quant import QuantizedTensor, check_bits, dequantize, quantize, quantized_bytes_per_value


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, tokens, ...) → (batch, heads, kept, ...) at index (batch, heads, kept)."""
    index = index.view(*index.shape, *[1] * (x.dim() - 3)).expand(*index.shape, *x.shape[3:])
    return torch.gather(x, 2, index)


class FullStore:
    def __init__(self):
        self.keys: torch.Tensor | None = None  # (batch, kv_heads, tokens, head_dim)
        self.values: torch.Tensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        self.keys, self.values = keys, values  # already held + new, as attend_kv built them

    def select(self, index: torch.Tensor) -> None:
        self.keys, self.values = gather_tokens(self.keys, index), gather_tokens(self.values, index)

    def materialize(self):
        return self.keys, self.values

    def tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)


class QuantStore:
    """Per-token K and V codes (groups along head_dim), so any token can be kept or dropped."""

    def __init__(self, bits: int, group: int, rotate: bool = False):
        check_bits(bits)
        self.bits, self.group, self.rotate = bits, group, rotate
        self.keys: QuantizedTensor | None = None
        self.values: QuantizedTensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        qk = quantize(keys[:, :, -new:], self.bits, self.group, self.rotate)  # only the new tokens are quantized
        qv = quantize(values[:, :, -new:], self.bits, self.group, self.rotate)
        self.keys = qk if self.keys is None else concat(self.keys, qk)
        self.values = qv if self.values is None else concat(self.values, qv)

    def select(self, index: torch.Tensor) -> None:
        self.keys, self.values = select_quantized(self.keys, index), select_quantized(self.values, index)

    def materialize(self):
        if self.keys is None:
            return None, None
        return dequantize(self.keys), dequantize(self.values)

    def tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def nbytes(self) -> int:
        return sum(q.nbytes() for q in (self.keys, self.values) if q is not None)


def concat(a: QuantizedTensor, b: QuantizedTensor) -> QuantizedTensor:
    """Two per-token quantized tensors joined along the token dim (dim 2)."""
    shape = (*a.shape[:2], a.shape[2] + b.shape[2], a.shape[3])
    return dataclasses.replace(a, codes=torch.cat([a.codes, b.codes], 2), scale=torch.cat([a.scale, b.scale], 2),
                               low=torch.cat([a.low, b.low], 2), shape=shape)


def select_quantized(q: QuantizedTensor, index: torch.Tensor) -> QuantizedTensor:
    shape = (*q.shape[:2], index.shape[2], q.shape[3])
    return dataclasses.replace(q, codes=gather_tokens(q.codes, index), scale=gather_tokens(q.scale, index),
                               low=gather_tokens(q.low, index), shape=shape)


class EvictionLayer(PolicyLayer):
    """Holds at most ``capacity`` tokens; ``keep`` names which survive each step."""

    def __init__(self, capacity: int, bits: int | None = None, group: int = 32, rotate: bool = False):
        super().__init__()
        self.capacity = capacity
        self.held = FullStore() if bits is None else QuantStore(bits, group, rotate)

    def materialize(self):
        return self.held.materialize()

    def store(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        self.observe(keys, new)
        self.held.extend(keys, values, new)
        if self.held.tokens() > self.capacity:
            index = self.keep(keys, new)  # (batch, kv_heads, capacity), ascending
            self.held.select(index)
            self.after_eviction(index)

    def observe(self, keys: torch.Tensor, new: int) -> None:
        """Hook for policies that score tokens as they arrive (before eviction)."""

    @abstractmethod
    def keep(self, keys: torch.Tensor, new: int) -> torch.Tensor:
        """Indices (batch, kv_heads, capacity) into the held + new tokens, ascending."""

    def after_eviction(self, index: torch.Tensor) -> None:
        """Hook for policies with per-token state to keep in step with the store."""

    def held_tokens(self) -> int:
        return self.held.tokens()

    def full_precision_tensors(self):
        return [self.held.keys, self.held.values] if isinstance(self.held, FullStore) else []

    def nbytes(self) -> int:
        return self.held.nbytes() + self.state_nbytes()

    def state_nbytes(self) -> int:
        """Bytes of any bookkeeping tensors the policy keeps (scores, query buffers)."""
        return 0


def recent_and_top(scores: torch.Tensor, capacity: int, recent: int) -> torch.Tensor:
    """Keep the last ``recent`` tokens and the ``capacity - recent`` best-scored older ones.

    scores: (batch, kv_heads, tokens) → indices (batch, kv_heads, capacity), ascending.
    """
    batch, heads, tokens = scores.shape
    older = tokens - recent
    top = scores[..., :older].topk(capacity - recent, dim=-1).indices  # (batch, heads, capacity - recent)
    last = torch.arange(older, tokens, device=scores.device).expand(batch, heads, recent)
    return torch.cat([top, last], dim=-1).sort(dim=-1).values


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, new: int, chunk: int = 256) -> torch.Tensor:
    """Softmax attention of the step's queries over keys, summed over queries and each KV group's heads.

    queries (batch, heads, q, d); keys (batch, kv_heads, n, d) whose last ``new`` tokens are this
    step's (the causal mask applies to them). Returns (batch, kv_heads, n) float32.
    """
    batch, heads, q_len, dim = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    grouped = queries.float().view(batch, kv_heads, heads // kv_heads, q_len, dim)
    keys = keys.float().unsqueeze(2)  # (batch, kv_heads, 1, n, dim)
    total = torch.zeros(batch, kv_heads, n, device=keys.device)
    key_pos = torch.arange(n, device=keys.device)
    for start in range(0, q_len, chunk):  # bounded transient: (…, chunk, n) logits at a time
        q = grouped[:, :, :, start:start + chunk]
        logits = q @ keys.transpose(-1, -2) / dim**0.5  # (batch, kv_heads, group, c, n)
        query_pos = n - q_len + start + torch.arange(q.shape[3], device=keys.device)
        logits = logits.masked_fill(key_pos > query_pos[:, None], float("-inf"))
        total += logits.softmax(dim=-1).sum(dim=(2, 3))
    return total


def tokens_for_budget(budget: float, context: int, bits: int | None, group: int, head_dim: int | None,
                      dtype_bytes: int = 2, state_bytes: float = 0.0) -> int:
    """Tokens a store can hold within ``budget`` × the full-precision cache of ``context`` tokens.

    ``state_bytes``: bookkeeping held per token and KV head beside its K and V (H2O's float32 score),
    so that the policy's measured bytes, bookkeeping included, stay within the budget. ``head_dim`` is
    the model's (``model_head_dim``); it cancels out when there is no bookkeeping, so only then may it
    be None. ``nbytes()`` measures what is really held.
    """
    if head_dim is None:
        if state_bytes:
            raise LeanLMError("sizing a cache with per-token bookkeeping needs the model's head_dim: "
                              "pass model= to make_policy (or head_dim=)")
        head_dim = 1  # no bookkeeping: every token costs 2 × head_dim × per_value, head_dim cancels
    per_value = dtype_bytes if bits is None else quantized_bytes_per_value(bits, group)
    full_token = 2 * head_dim * dtype_bytes  # K and V of one token and KV head, full precision
    held_token = 2 * head_dim * per_value + state_bytes
    return max(1, int(budget * context * full_token / held_token))


def model_head_dim(model) -> int:
    """The head_dim of a model or its config: ``config.head_dim``, else hidden_size // attention heads."""
    config = getattr(model, "config", model)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
