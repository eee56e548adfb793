"""Decoding through the ``quantized`` cache with the lean step (``KiviLayer.lean_attend``, the C++ kernel
``leanlm::quantized_decode_attention``): the kernel against attention over the dequantized cache in
float64, and whole decodes against the stock forward over the same policy (fused torch attention),
step by step, across residual flushes."""

from __future__ import annotations

import pytest
import torch

from leanlm.engine import generate, kernels
from leanlm.engine.decode import forward, prefill, start_state
from leanlm.engine.lean_step import lean_step, use_lean_step
from leanlm.kvcache import attach
from leanlm.kvcache.quant import dequantize, hadamard, quantize
from leanlm.kvcache.quantized import Quantized
from leanlm.models import tiny_llama, tiny_qwen2

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="leanlm's CPU kernels cannot be built here")


def reference(q, keys, values, scale):
    """Softmax attention in float64: q (B, H, D), keys/values (B, KVH, T, D) → (B, H, D)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, 1)
    v = values.double().repeat_interleave(group, 1)
    p = (torch.einsum("bhd,bhtd->bht", q.double(), k) * scale).softmax(-1)
    return torch.einsum("bht,bhtd->bhd", p, v)


@needs_kernels
@pytest.mark.parametrize("key_bits,value_bits,group,rotate", [(4, 2, 64, True), (8, 4, 32, False), (2, 8, 32, True),
                                                             (4, 4, 32, True)])
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_attention_over_the_dequantized_cache(key_bits, value_bits, group, rotate, residual_dtype):
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, heads, dim, tokens, residual = 2, 2, 6, 64, 3 * 64, 5
    keys, values = (torch.randn(batch, kv_heads, tokens, dim, generator=gen) for _ in range(2))
    keys[..., 3] *= 8  # an outlier channel, as real keys have
    qk = quantize(keys.transpose(2, 3).contiguous(), key_bits, group)  # per channel, groups of tokens
    qv = quantize(values, value_bits, group, rotate)  # per token
    res_k, res_v = (torch.randn(batch, kv_heads, residual, dim, generator=gen).to(residual_dtype) for _ in range(2))
    q = torch.randn(batch, heads, dim, generator=gen)
    got = torch.ops.leanlm.quantized_decode_attention(q, qk.codes, qk.scale, qk.low, qv.codes, qv.scale, qv.low,
                                                      hadamard(dim) if rotate else None, res_k, res_v, key_bits,
                                                      value_bits, 0.125, False)  # float32 FMAs (int8: test_int8_attention)
    all_k = torch.cat([dequantize(qk).transpose(2, 3).float(), res_k.float()], 2)
    all_v = torch.cat([dequantize(qv).float(), res_v.float()], 2)
    want = reference(q, all_k, all_v, 0.125)
    assert got.shape == q.shape
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-4)


def decode_both(model, ids, policy, steps):
    """Greedy steps with the lean step and with the stock forward, each through its own cache under
    ``policy``, fed the same tokens: yields (lean logits, stock logits, lean cache, stock cache)."""
    with attach(model, policy) as lean_cache, attach(model, policy) as stock_cache:
        states = [start_state(model, ids, None, cache, ids.shape[1] + steps) for cache in (lean_cache, stock_cache)]
        with torch.inference_mode():
            logits = [prefill(model, ids, state) for state in states]
            step = lean_step(model, lean_cache)
            assert step is not None and step.policy
            for _ in range(steps):
                token = logits[1].argmax(-1)[:, None]
                logits = [step(token, states[0]), forward(model, token, states[1])[:, -1]]
                yield logits[0], logits[1], lean_cache, stock_cache


@pytest.mark.parametrize("family,bits,value_bits", [("llama", 4, 2), ("qwen2", 8, 4), ("llama", 3, 3)])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_lean_quantized_decode_equals_the_stock_forward(family, bits, value_bits, use_kernel, monkeypatch):
    monkeypatch.setenv("LEANLM_KV_COMPILE", "0")  # the stock side's fused attention in eager torch (no compile wait)
    build = tiny_llama if family == "llama" else tiny_qwen2
    model = build(num_layers=2, num_heads=4, num_kv_heads=2).eval()
    ids = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(3))
    policy = Quantized(bits=bits, value_bits=value_bits, group=8 if bits == 3 else 16, residual=16)
    with kernels.use_kernels(use_kernel), kernels.use_int8_attention(False):  # float32 (int8: test_int8_attention)
        for lean, stock, lean_cache, stock_cache in decode_both(model, ids, policy, steps=20):  # two flushes
            assert torch.allclose(lean, stock, atol=1e-4, rtol=1e-4)
            for mine, theirs in zip(lean_cache.layers, stock_cache.layers):
                assert mine.seen == theirs.seen and mine.held_tokens() == theirs.held_tokens()
                assert mine.nbytes() == theirs.nbytes()
                assert torch.equal(mine.qkeys.codes, theirs.qkeys.codes)


def test_generate_takes_the_lean_step_through_a_quantized_cache(monkeypatch):
    monkeypatch.setenv("LEANLM_KV_COMPILE", "0")
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=1).eval()
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(4))
    policy = Quantized(bits=4, value_bits=2, group=16, residual=16)
    with attach(model, policy) as cache, kernels.use_int8_attention(False):  # token-exact: the float32 path
        assert lean_step(model, cache) is not None
        lean = generate(model, ids, 12, cache=cache)
        held = cache.nbytes()
    with use_lean_step(False), attach(model, policy) as cache:
        assert lean_step(model, cache) is None
        stock = generate(model, ids, 12, cache=cache)
        assert cache.nbytes() == held  # the same codes held either way
    assert torch.equal(lean, stock)
