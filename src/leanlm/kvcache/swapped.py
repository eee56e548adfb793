"""Cache layers of swapped attention layers (``transforms/swap_attention``): bounded, whatever the length.

- ``WindowLayer`` (sliding-window attention): the first ``sink`` tokens' K/V and the last ``window - 1``
  (the next query, with itself, then sees ``window`` recent tokens). At most ``sink + window - 1``
  tokens per KV head, however long the text.
- ``RecurrentLayer`` (linear attention): a window as above for its local softmax branch, plus the
  recurrent state, one ``(features, head_dim + 1)`` float32 matrix per KV head (the last column is
  the normaliser). Its size never depends on the sequence length.

``nbytes()`` is the bytes of every tensor the layer holds between steps. Both are transformers cache
layers (``DynamicLayer`` subclasses, ``is_sliding`` so the model's mask is built from a layer that
kept full attention), so they live inside a ``DynamicCache`` — the engine's, ``model.generate``'s or
the protocols' — beside the kept layers' K/V: a swapped attention module installs its layer into
the cache on its first forward (``cache_layer``), replacing the empty layer the cache made for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import tensor_bytes


class WindowLayer(DynamicLayer):
    """Sink + sliding-window K/V of one swapped layer; ``attend`` returns what a step attends to."""

    is_sliding = True  # transformers builds the shared causal mask from a full-attention layer instead
    is_croppable = False

    def __init__(self, sink: int, window: int):
        super().__init__()
        self.sink, self.window = sink, window
        self.seen = 0  # text tokens this layer has been given (the next query's index)
        self.peak = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = self.values = None
        self.is_initialized = True

    def held_positions(self) -> torch.Tensor:
        """Text index of each held token (sinks first, then the window), (held,)."""
        sinks = min(self.seen, self.sink)
        tail_start = max(sinks, self.seen - (self.window - 1))
        return torch.cat([torch.arange(sinks), torch.arange(tail_start, self.seen)])

    def attend(self, keys: torch.Tensor, values: torch.Tensor):
        """Append this step's K/V (batch, kv_heads, q, head_dim); keep the bounded set.

        Returns the keys and values this step attends to (held + new), their text indices (kv,),
        and the text indices of the new tokens (q,).
        """
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        new = keys.shape[-2]
        positions = torch.cat([self.held_positions(), torch.arange(self.seen, self.seen + new)])  # (held + q,)
        if self.keys is not None:
            keys, values = torch.cat([self.keys, keys], -2), torch.cat([self.values, values], -2)
        self.seen += new
        keep = (positions < self.sink) | (positions > self.seen - self.window)  # what the next query needs
        index = keep.nonzero().squeeze(-1).to(keys.device)
        self.keys, self.values = keys.index_select(-2, index), values.index_select(-2, index)  # (b, kv, <= s + w - 1, d)
        self.peak = max(self.peak, self.nbytes() + tensor_bytes(keys, values))
        return keys, values, positions, positions[-new:]

    def update(self, key_states, value_states, *args, **kwargs):
        raise LeanLMError("a swapped attention layer's cache is updated by its own module, not by stock attention")

    def held_tokens(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held between steps (what ``nbytes`` counts)."""
        return [t for t in (self.keys, self.values) if t is not None]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # as a full layer would: only used if no layer kept full attention

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.seen, self.peak = 0, 0


class RingWindowLayer(WindowLayer):
    """A ``WindowLayer`` in a preallocated ring of ``sink + window`` slots, written in place.

    Token ``p`` lives in slot ``p`` while ``p < sink``, else in slot ``sink + (p - sink) % window``: a new
    token overwrites the one that just left the window, so the ring holds the sinks and the last
    ``window`` tokens and nothing is gathered or copied per step. Slots ``[0, min(seen, sink + window))``
    are written; attention is order-free (keys are stored after RoPE), so the engine's decode step
    (``engine/lean_step``) writes the step's K/V into ``ring_slot`` and attends over the written slots
    with ``leanlm::decode_attention``. Made by ``engine.static_cache`` for the sliding-window layers of a
    swapped model, beside the ``StaticLayer``s of the layers that kept full attention.
    ``nbytes()`` is the whole preallocated ring (one slot more than a ``WindowLayer`` holds between steps).
    """

    def __init__(self, sink: int, window: int):
        super().__init__(sink, window)
        self.capacity = sink + window

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])

    def ring_slot(self, positions: torch.Tensor) -> torch.Tensor:
        """The slot of each text index (a tensor; the decode step computes it inside a compiled graph too)."""
        return torch.where(positions < self.sink, positions, self.sink + (positions - self.sink) % self.window)

    def held_positions(self) -> torch.Tensor:
        """Text index of the token in each written slot, (written,)."""
        written = torch.arange(min(self.seen, self.capacity))
        if self.seen <= self.capacity:
            return written
        last = self.seen - 1  # the newest token; slot s >= sink holds the latest p <= last in its residue class
        lag = (self.ring_slot(torch.tensor(last)) - written) % self.window
        return torch.where(written < self.sink, written, last - lag)

    def attend(self, keys: torch.Tensor, values: torch.Tensor):
        """As ``WindowLayer.attend`` (held + new K/V and their text indices); the kept new tokens go to their slots."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        new, written = keys.shape[-2], min(self.seen, self.capacity)
        new_positions = torch.arange(self.seen, self.seen + new)
        positions = torch.cat([self.held_positions(), new_positions])
        step_keys = torch.cat([self.keys[:, :, :written], keys], -2)
        step_values = torch.cat([self.values[:, :, :written], values], -2)
        self.seen += new
        kept = ((new_positions < self.sink) | (new_positions >= self.seen - self.window)).nonzero().squeeze(-1)
        slots = self.ring_slot(new_positions[kept]).to(keys.device)  # distinct: at most ``window`` past the sinks
        self.keys.index_copy_(2, slots, keys.index_select(2, kept.to(keys.device)))
        self.values.index_copy_(2, slots, values.index_select(2, kept.to(keys.device)))
        self.peak = max(self.peak, self.nbytes() + tensor_bytes(step_keys, step_values))
        return step_keys, step_values, positions, new_positions

    def held_tokens(self) -> int:
        return min(self.seen, self.capacity)

    @classmethod
    def from_window(cls, layer: WindowLayer) -> RingWindowLayer:
        """A ring holding what ``layer`` holds (the token it dropped last would be overwritten next step anyway)."""
        ring = cls(layer.sink, layer.window)
        if layer.keys is not None:
            ring.lazy_initialization(layer.keys, layer.values)
            slots = ring.ring_slot(layer.held_positions()).to(layer.keys.device)
            ring.keys.index_copy_(2, slots, layer.keys)
            ring.values.index_copy_(2, slots, layer.values)
        ring.seen = layer.seen
        return ring

    def reset(self) -> None:
        if self.keys is not None:  # keep the ring's storage (a compiled step holds its address)
            self.keys.zero_()
            self.values.zero_()
        self.seen, self.peak = 0, 0


class RecurrentLayer(WindowLayer):
    """A window (the local softmax branch) + the recurrent state of a linear-attention layer."""

    def __init__(self, sink: int, window: int):
        super().__init__(sink, window)
        self.state: torch.Tensor | None = None  # (batch, kv_heads, features, head_dim + 1) float32

    def nbytes(self) -> int:
        return super().nbytes() + tensor_bytes(self.state)

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([self.state] if self.state is not None else [])

    def reset(self) -> None:
        super().reset()
        self.state = None


def cache_layer(cache, index: int, make: Callable[[], WindowLayer]) -> WindowLayer | None:
    """The swapped layer ``index``'s own cache layer inside ``cache`` (installed on first use); None without a cache."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise LeanLMError(f"a swapped attention layer needs a transformers Cache with layers, got {type(cache).__name__}")
    while len(layers) <= index:  # a DynamicCache made without a config creates its layers as they are used
        layers.append(DynamicLayer())
    layer = layers[index]
    if isinstance(layer, WindowLayer):
        return layer
    if not isinstance(layer, DynamicLayer) or getattr(layer, "is_initialized", False):
        raise LeanLMError(f"layer {index} was swapped to a bounded attention, but the cache gave it a "
                          f"{type(layer).__name__} already in use; decode swapped models with a DynamicCache")
    layers[index] = make()
    return layers[index]


def swapped_nbytes(cache) -> dict[int, int]:
    """Bytes held by each swapped layer of ``cache`` (layer index -> bytes)."""
    return {i: layer.nbytes() for i, layer in enumerate(getattr(cache, "layers", [])) if isinstance(layer, WindowLayer)}


__all__ = ["RecurrentLayer", "RingWindowLayer", "WindowLayer", "cache_layer", "swapped_nbytes"]
