"""The lean decode step (engine/lean_step.py) against transformers' own forward: the same logits and
the same cache after every step (Llama with GQA, Qwen2 with q/k/v biases, a left-padded batch), the
kernel and the SDPA fallback alike; models it cannot reproduce are left to the stock forward."""

from __future__ import annotations

import pytest
import torch

from leanlm.engine import kernels, left_pad, static_cache
from leanlm.engine.decode import forward, prefill, start_state
from leanlm.engine.lean_step import lean_step, runs_lean, use_lean_step
from leanlm.models import tiny_gemma3, tiny_llama, tiny_qwen2

STEPS = 5


def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 100, (n,), generator=gen).tolist() for n in (7, 4, 9)]


def decode_both(model, ids, mask):
    """Greedy steps through a stock-forward cache and a lean-step cache, fed the same tokens:
    (lean logits, stock logits, lean cache, stock cache) per step."""
    room = ids.shape[1] + STEPS
    caches = static_cache(model, room), static_cache(model, room)
    states = [start_state(model, ids, mask, cache, room) for cache in caches]
    with torch.inference_mode():
        logits = [prefill(model, ids, state) for state in states]
        step = lean_step(model, caches[0])
        assert step is not None
        for _ in range(STEPS):
            token = logits[1].argmax(-1)[:, None]
            logits = [step(token, states[0]), forward(model, token, states[1])[:, -1]]
            yield logits[0], logits[1], caches[0], caches[1]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_lean_step_equals_the_stock_forward_on_a_padded_batch(family, use_kernel):
    build = tiny_llama if family == "llama" else tiny_qwen2
    model = build(num_layers=2, num_heads=4, num_kv_heads=2).eval()
    ids, mask = left_pad(prompts())
    with kernels.use_kernels(use_kernel):
        for lean, stock, lean_cache, stock_cache in decode_both(model, ids, mask):
            assert torch.allclose(lean, stock, atol=1e-5, rtol=1e-5)
            for mine, theirs in zip(lean_cache.layers, stock_cache.layers):
                assert torch.allclose(mine.keys, theirs.keys, atol=1e-5) and torch.allclose(mine.values, theirs.values, atol=1e-5)
                assert int(mine.cumulative_length) == int(theirs.cumulative_length)


def test_lean_step_in_bf16_stays_within_bf16_rounding_of_the_stock_forward():
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=1).to(torch.bfloat16).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    for lean, stock, _, _ in decode_both(model, ids, None):
        assert (lean.float() - stock.float()).abs().max() <= 0.05 * stock.float().abs().max()


def test_what_the_lean_step_cannot_reproduce_decodes_through_the_model():
    llama = tiny_llama(num_layers=2)
    assert runs_lean(llama)
    assert not runs_lean(tiny_gemma3(num_layers=2))  # sliding windows, other norms: the stock forward
    with use_lean_step(False):
        assert not runs_lean(llama)
    handle = llama.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert not runs_lean(llama) and lean_step(llama, static_cache(llama, 8)) is None
    handle.remove()
    assert lean_step(llama, None) is None  # a DynamicCache (or none): the stock forward


@pytest.mark.skipif(not kernels.available(), reason="leanlm's CPU kernels cannot be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pads", [9, 70])  # 70: the first 64-slot block of the row is all pads
def test_decode_attention_kernel_matches_a_float64_reference(dtype, pads):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 64, generator=gen).to(dtype)  # 6 query heads over 2 kv heads
    keys, values = (torch.randn(2, 2, 150, 64, generator=gen).to(dtype) for _ in range(2))
    keep = torch.ones(2, 150, dtype=torch.long)
    keep[1, :pads] = 0  # a left-padded row
    got = torch.ops.leanlm.decode_attention(q, keys, values, torch.tensor([130]), keep, 0.125)
    k, v = keys[:, :, :130].double().repeat_interleave(3, 1), values[:, :, :130].double().repeat_interleave(3, 1)
    scores = torch.einsum("bhd,bhld->bhl", q.double(), k) * 0.125
    scores = scores.masked_fill(keep[:, None, :130] == 0, float("-inf"))
    reference = torch.einsum("bhl,bhld->bhd", scores.softmax(-1), v)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7 * reference.abs().max()
    assert got.dtype == dtype and got.shape == (2, 6, 64)
    assert (got.double() - reference).abs().max() <= tolerance
    with pytest.raises(RuntimeError, match="length"):
        torch.ops.leanlm.decode_attention(q, keys, values, torch.tensor([151]), None, 0.125)
