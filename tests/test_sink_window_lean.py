"""sink_window through the engine's lean step: a ring of sink + window + 1 slots, no gather per step."""

from __future__ import annotations

import pytest
import torch

from leanlm.engine import generate
from leanlm.engine.decode import forward, prefill, start_state
from leanlm.engine.lean_step import lean_step
from leanlm.kvcache import attach
from leanlm.kvcache.sink_window import SinkWindow
from leanlm.models import tiny_llama, tiny_qwen2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("prompt,sink,window", [(21, 4, 8), (5, 2, 12), (3, 4, 6), (30, 0, 7)])
def test_lean_sink_window_equals_the_stock_forward_step_by_step(family, prompt, sink, window):
    build = tiny_llama if family == "llama" else tiny_qwen2
    model = build(num_layers=2, num_heads=4, num_kv_heads=2).eval()
    ids = torch.randint(0, 100, (2, prompt), generator=torch.Generator().manual_seed(3))
    policy, steps = SinkWindow(sink=sink, window=window), 25  # past the capacity and round the ring twice
    with attach(model, policy) as lean_cache, attach(model, policy) as stock_cache, torch.inference_mode():
        states = [start_state(model, ids, None, cache, prompt + steps) for cache in (lean_cache, stock_cache)]
        logits = [prefill(model, ids, state, 8) for state in states]
        step = lean_step(model, lean_cache)
        assert step is not None and step.policy
        for _ in range(steps):
            token = logits[1].argmax(-1)[:, None]
            logits = [step(token, states[0]), forward(model, token, states[1])[:, -1]]
            assert torch.allclose(logits[0], logits[1], atol=1e-4), (logits[0] - logits[1]).abs().max()
            mine, theirs = lean_cache.layers[0], stock_cache.layers[0]
            assert mine.seen == theirs.seen
            # the ring holds what the stock store holds plus, once full, the one token it keeps for the next step
            assert theirs.held_tokens() == min(theirs.seen, sink + window)
            assert mine.held_tokens() == min(mine.seen, sink + window + 1)
            assert mine.nbytes() == sum(t.numel() * t.element_size() for t in mine.ring)
        lean_cache.layers[0].unroll()  # back to the stock store: the same tokens as the stock path holds
        for mine, theirs in zip(lean_cache.layers[:1], stock_cache.layers[:1]):
            assert torch.equal(mine.held.keys, theirs.held.keys) and torch.equal(mine.held.values, theirs.held.values)


def test_generate_through_sink_window_takes_the_lean_step_unless_quantized_or_cache_positions():
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=1).eval()
    ids = torch.randint(0, 100, (1, 30), generator=torch.Generator().manual_seed(4))
    with attach(model, SinkWindow(sink=2, window=9)) as cache:
        assert lean_step(model, cache) is not None
        lean = generate(model, ids, 16, cache=cache)
        # a stock step after lean ones goes back to the stock store first, then keeps going
        forward(model, lean[:, -1:], start_state(model, ids, None, cache, 100))
        assert cache.layers[0].ring is None and cache.layers[0].held_tokens() == 11
    for policy in (SinkWindow(sink=2, window=9, bits=4), SinkWindow(sink=2, window=9, position_mode="cache")):
        with attach(model, policy) as cache:
            assert lean_step(model, cache) is None  # quantized tokens / re-rotated keys: the stock forward
