"""Sliding-window layers of a swapped model decode through the lean step over a ring of sink + window slots."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from leanlm.engine.decode import forward, generate, left_pad, prefill, start_state
from leanlm.engine.lean_step import LeanStep, lean_step
from leanlm.engine.static_cache import capacity, held_bytes, static_cache, static_copy
from leanlm.errors import LeanLMError
from leanlm.kvcache.swapped import RingWindowLayer
from leanlm.models import tiny_llama, tiny_qwen2
from leanlm.transforms import Transform

IDS = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(5))


def swapped(make=tiny_llama, layers=(0, 2), **settings):
    torch.manual_seed(0)
    model = make(num_layers=3, num_heads=4, num_kv_heads=2)
    Transform.from_dict({"name": "swap_attention", "replacement": "sliding_window", "layers": list(layers), **settings}).apply(model)
    return model


def test_ring_slots_and_held_positions_by_hand():
    ring = RingWindowLayer(sink=2, window=3)  # slots: 0, 1 sinks; 2, 3, 4 the window
    assert ring.ring_slot(torch.arange(10)).tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 2, 3]
    k = torch.arange(9.0).view(1, 1, 9, 1).expand(1, 1, 9, 2).contiguous()  # token p's key is p
    ring.attend(k[:, :, :4], k[:, :, :4])
    assert ring.held_positions().tolist() == [0, 1, 2, 3]
    keys, _, positions, new = ring.attend(k[:, :, 4:9], k[:, :, 4:9])  # 4..8: the window keeps 6, 7, 8
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] and new.tolist() == [4, 5, 6, 7, 8]
    assert torch.equal(keys[0, 0, :, 0], positions.float())
    assert ring.held_positions().tolist() == [0, 1, 8, 6, 7]  # slot 2 <- 8, 3 <- 6, 4 <- 7
    assert ring.keys[0, 0, :, 0].tolist() == [0, 1, 8, 6, 7]  # what the slots really hold
    assert ring.nbytes() == ring.keys.numel() * 4 * 2 == sum(t.numel() * t.element_size() for t in ring.tensors())


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("sink,window,chunk", [(2, 6, 7), (0, 5, 4), (3, 40, 9)])
@torch.no_grad()
def test_lean_ring_decode_equals_the_stock_forward_step_by_step(make, sink, window, chunk):
    model = swapped(make, window=window, sink=sink)
    new = 25  # wraps a small ring several times
    lean_cache, stock_cache = static_cache(model, IDS.shape[1] + new), DynamicCache()
    assert isinstance(lean_cache.layers[0], RingWindowLayer) and lean_cache.layers[0].capacity == sink + window
    lean_state = start_state(model, IDS, None, lean_cache, IDS.shape[1] + new)
    stock_state = start_state(model, IDS, None, stock_cache, IDS.shape[1] + new)
    lean_logits, stock_logits = prefill(model, IDS, lean_state, chunk), prefill(model, IDS, stock_state, chunk)
    assert torch.allclose(lean_logits, stock_logits, atol=1e-5)  # prefill through the ring = through the window layer
    step = lean_step(model, lean_cache)
    assert isinstance(step, LeanStep) and step.rings == {0: (sink, window), 2: (sink, window)}
    for _ in range(new):
        token = stock_logits.argmax(-1, keepdim=True)
        lean_logits, stock_logits = step(token, lean_state), forward(model, token, stock_state)[:, -1]
        assert torch.allclose(lean_logits, stock_logits, atol=1e-4), (lean_logits - stock_logits).abs().max()
    bytes_before = lean_cache.layers[0].nbytes()
    assert lean_cache.layers[0].seen == IDS.shape[1] + new and bytes_before == 2 * 2 * 2 * (sink + window) * 16 * 4
    assert held_bytes(lean_cache) == sum(t.numel() * t.element_size() for layer in lean_cache.layers
                                         for t in (layer.keys, layer.values))


@torch.no_grad()
def test_compiled_ring_step_equals_eager_and_the_dynamic_cache():
    model = swapped(window=6, sink=2)
    eager = generate(model, IDS, 20, cache=DynamicCache(), prefill_chunk=7)  # stock forward, growing window layers
    lean = generate(model, IDS, 20, cache=static_cache(model, IDS.shape[1] + 20), prefill_chunk=7)
    compiled = generate(model, IDS, 20, cache=static_cache(model, IDS.shape[1] + 20), prefill_chunk=7, compile=True)
    assert torch.equal(lean, eager) and torch.equal(compiled, eager)


def test_ring_layers_do_not_count_towards_the_static_capacity_and_padding_is_refused():
    model = swapped(window=4, sink=1)
    cache = static_cache(model, 30)
    assert capacity(cache) == 30  # the full-attention layer's slots, not the ring's 5
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    state = start_state(model, ids, mask, cache, 10)
    with torch.no_grad():
        logits = prefill(model, ids, state)
        with pytest.raises(LeanLMError, match="unpadded"):
            lean_step(model, cache)(logits.argmax(-1, keepdim=True), state)


@torch.no_grad()
def test_a_filled_dynamic_cache_copied_to_rings_decodes_the_same():
    model = swapped(window=5, sink=2)
    dynamic = DynamicCache()
    state = start_state(model, IDS, None, dynamic, IDS.shape[1] + 12)
    logits = prefill(model, IDS, state, 8)
    static_state = start_state(model, IDS, None, static_copy(model, dynamic, IDS.shape[1] + 12), IDS.shape[1] + 12)
    static_state.advance(IDS.shape[1])
    step = lean_step(model, static_state.cache)
    static_logits = logits
    for _ in range(12):
        token = logits.argmax(-1, keepdim=True)
        static_logits = step(token, static_state)
        logits = forward(model, token, state)[:, -1]
        assert torch.allclose(static_logits, logits, atol=1e-4)
