"""The base of every run-time KV-cache policy: a transformers ``Cache`` whose layers really hold less.

A policy is a typed config dataclass (``CachePolicy``) that builds one ``PolicyLayer`` per decoder
layer. ``attach(model, policy)`` yields a ``PolicyCache`` to pass as ``past_key_values`` (to a forward
or to ``model.generate``) and removes its hooks on exit, so a model is never left modified:

    with attach(model, SinkWindow(sink=4, window=252)) as cache:
        model.generate(ids, past_key_values=cache, max_new_tokens=100)

Honest bytes: ``PolicyLayer.nbytes()`` is the bytes of the tensors the layer keeps between steps
(resident). Each ``update`` returns full-precision K/V for this step's attention; those are a
transient copy for compressed stores, and ``peak_nbytes`` counts them on top of what is resident.

Positions: a layer that evicts tokens holds fewer tokens than the text has seen. ``get_seq_length``
is what the layer holds (the attention mask is built from it); ``PolicyCache.seen_tokens`` is what the
text has seen. ``next_position_ids`` gives the positions of the next tokens: their place in the text
(``positions="original"``, the default) or their slot in the cache (``"cache"``, StreamingLLM's way).
After eviction, pass ``position_ids`` explicitly (``generate`` does so itself, with text positions).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from leanlm.errors import LeanLMError
from leanlm.models import arch_of


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the storage these tensors occupy (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PolicyLayer(DynamicLayer):
    """One decoder layer's cache under a policy. Subclasses implement ``store`` and ``nbytes``.

    ``update`` appends the new K/V, returns what this step attends to, then lets the policy decide
    what stays resident (``store``). ``queries`` holds this step's query states when the policy
    asked for them (``CachePolicy.needs_queries``), set by a hook just before ``update``.
    """

    is_croppable = False  # eviction cannot be undone

    def __init__(self):
        super().__init__()
        self.queries: torch.Tensor | None = None  # (batch, heads, q_len, head_dim), post-RoPE, see capture_queries
        self.seen = 0  # tokens of text this layer has been given
        self.peak = 0  # max over steps of resident + transient bytes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = self.values = None  # nothing held yet (DynamicLayer would put empty 1-D tensors here)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.attend_kv(key_states, value_states)  # (batch, kv_heads, held + q, head_dim)
        self.store(keys, values, new=key_states.shape[-2])
        self.seen += key_states.shape[-2]
        resident = {t.data_ptr() for t in self.full_precision_tensors() if t is not None}
        transient = tensor_bytes(*[t for t in (keys, values) if t.data_ptr() not in resident])
        self.peak = max(self.peak, self.nbytes() + transient)
        self.queries = None
        return keys, values

    def attend_kv(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-precision K/V this step attends to: what is held, then the new tokens."""
        held_keys, held_values = self.materialize()
        if held_keys is None:
            return key_states, value_states
        return torch.cat([held_keys, key_states], dim=-2), torch.cat([held_values, value_states], dim=-2)

    @abstractmethod
    def materialize(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The held K/V in full precision, (batch, kv_heads, held, head_dim), or (None, None)."""

    @abstractmethod
    def store(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        """Keep what the policy keeps of ``keys``/``values`` (held + ``new`` tokens)."""

    @abstractmethod
    def held_tokens(self) -> int:
        """Tokens resident in this layer (per head)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of every tensor this layer keeps between steps."""

    def full_precision_tensors(self) -> list[torch.Tensor | None]:
        """Resident tensors that ``update`` may hand to attention as they are (not a transient copy)."""
        return [self.keys, self.values]

    def get_seq_length(self) -> int:
        return self.held_tokens() if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.queries, self.seen, self.peak = None, 0, 0


class FullPrecisionLayer(PolicyLayer):
    """Keeps K/V as given (the shared storage of the eviction policies, and a 100%-budget reference)."""

    def materialize(self):
        return self.keys, self.values

    def store(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        self.keys, self.values = keys, values

    def held_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)


class ModelWindowLayer(FullPrecisionLayer):
    """A layer the model itself gives a sliding window (Gemma 3's local layers), kept as the stock cache
    keeps it: the last ``window - 1`` tokens, whatever the policy. Such a layer's memory is already
    bounded by the model, and its mask is built from text positions, which eviction would break, so
    a policy compresses only the model's full-attention layers. ``nbytes`` counts what it holds.
    """

    is_sliding = True

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def store(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        keep = self.window - 1
        self.keys, self.values = keys[:, :, -keep:], values[:, :, -keep:]  # (batch, kv_heads, <= window - 1, head_dim)

    def get_seq_length(self) -> int:
        return self.seen  # as transformers' DynamicSlidingWindowLayer: text tokens seen (the query offset)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held_tokens() if self.is_initialized else 0
        return held + query_length, self.seen - held  # keys attended, position of the first one


class PolicyCache(Cache):
    """A transformers Cache made of policy layers; reports resident/peak bytes and next positions."""

    def __init__(self, layers: list[PolicyLayer], positions: str = "original"):
        super().__init__(layers=layers)
        self.positions = positions

    @property
    def seen_tokens(self) -> int:
        return self.layers[0].seen if self.layers else 0

    def next_position_ids(self, num_tokens: int, batch: int = 1, device=None) -> torch.Tensor:
        """(batch, num_tokens) positions of the next tokens (see the module doc)."""
        start = self.seen_tokens if self.positions == "original" else self.get_seq_length()
        return torch.arange(start, start + num_tokens, device=device).expand(batch, -1)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def peak_nbytes(self) -> int:
        """Sum over layers of each layer's peak (layers run one after another, so this bounds the peak)."""
        return sum(layer.peak for layer in self.layers)

    def held_tokens(self) -> int:
        return max((layer.held_tokens() for layer in self.layers), default=0)


@dataclass
class CachePolicy:
    """A policy's settings; ``make_layer`` builds one layer's cache. Subclass per technique."""

    name: ClassVar[str]
    needs_queries: ClassVar[bool] = False  # set by policies that score tokens by attention
    positions: ClassVar[str] = "original"

    @abstractmethod
    def make_layer(self, layer_idx: int, model: nn.Module) -> PolicyLayer: ...

    @classmethod
    @abstractmethod
    def for_budget(cls, budget: float, context: int) -> CachePolicy:
        """Settings that hold ``budget`` × the full bf16 cache bytes of a ``context``-token text."""

    def describe(self) -> dict:
        return {"policy": self.name, **asdict(self)}

    def hooks(self, model: nn.Module, cache: PolicyCache) -> list:
        """Extra hook handles this policy needs on ``model`` while attached (``attach`` removes them).

        Registered after the query hooks, so a policy's attention pre-hook sees ``layer.queries``.
        """
        return []


def check_budget(budget: float) -> None:
    if not 0 < budget <= 1:
        raise LeanLMError(f"KV budget must be in (0, 1] (a fraction of the full cache bytes), got {budget}")


def capture_queries(view, args: tuple, kwargs: dict, cache: PolicyCache) -> None:
    """Forward pre-hook on an attention module (``view``: its arch view): hand its post-RoPE queries to its cache layer."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (batch, q, hidden)
    # Policies score q·k / sqrt(head_dim): the queries come scaled so that this is the model's logit.
    cache.layers[view.index].queries = view.scoring_queries(hidden, kwargs["position_embeddings"])  # (batch, heads, q, head_dim)


def policy_layers(model: nn.Module, policy: CachePolicy) -> list[PolicyLayer]:
    """One cache layer per decoder layer: the policy's, or the model's own window on a sliding layer."""
    return [ModelWindowLayer(view.sliding_window) if view.sliding_window else policy.make_layer(view.index, model)
            for view in arch_of(model).attentions()]


@contextmanager
def attach(model: nn.Module, policy: CachePolicy) -> Iterator[PolicyCache]:
    """A fresh cache for ``model`` under ``policy``; hooks (if any) are removed on exit."""
    cache = new_cache(model, policy)
    with hooked(model, policy, cache):
        yield cache


def new_cache(model: nn.Module, policy: CachePolicy) -> PolicyCache:
    """An empty cache for ``model`` under ``policy`` (no hooks: run its forwards inside ``hooked``)."""
    return PolicyCache(policy_layers(model, policy), positions=policy.positions)


@contextmanager
def hooked(model: nn.Module, policy: CachePolicy, cache: PolicyCache) -> Iterator[PolicyCache]:
    """``policy``'s hooks for ``cache`` on ``model`` while inside; re-enterable around each forward, so
    several caches (a server's sequences) can take turns on one model."""
    handles = []
    if policy.needs_queries:
        for view in arch_of(model).attentions():
            if view.sliding_window:
                continue  # the model's own window (ModelWindowLayer) scores nothing
            hook = lambda module, args, kwargs, view=view: capture_queries(view, args, kwargs, cache)  # noqa: E731
            handles.append(view.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        handles += policy.hooks(model, cache)
        yield cache
    finally:
        for handle in handles:
            handle.remove()
