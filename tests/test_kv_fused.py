"""Fused compressed attention and in-place eviction: equal to dequantize-then-attend and to the gather reference."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from leanlm.kvcache import HeavyHitter, Quantized, attach, make_policy
from leanlm.kvcache import fused_kernels as fk
from leanlm.kvcache.fused import ATTENTION_NAME, LAYER_ATTRIBUTE
from leanlm.kvcache.quant import dequantize, hadamard, quantize
from leanlm.models import tiny_llama

from kv_helpers import run_chunks, tiny_kv_model
from test_kvcache import reachable_tensors


@pytest.fixture
def eager(monkeypatch):
    """Kernels run as plain torch (compilation is tested once, in its own test)."""
    monkeypatch.setenv("LEANLM_KV_COMPILE", "0")


def _feed(model, ids, cache, prefill: int):
    """Logits of a prefill of ``prefill`` tokens, then one token per step (the fused decode path)."""
    return torch.cat([run_chunks(model, ids[:, :prefill], cache, prefill), run_chunks(model, ids[:, prefill:], cache, 1)], 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernels_equal_dequantize_then_multiply(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 64, 32, generator=gen)  # (batch, kv_heads, tokens, head_dim)
    q = torch.randn(2, 3, 5, 32, generator=gen)  # (batch, kv_heads, queries, head_dim)
    p = torch.rand(2, 3, 5, 64, generator=gen)
    per_channel = quantize(x.transpose(2, 3).contiguous(), bits, 16)  # KIVI keys: groups of tokens
    assert torch.allclose(fk.channel_key_logits(q, per_channel.codes, per_channel.scale, per_channel.low, bits),
                          q @ dequantize(per_channel), atol=1e-4)
    per_token = quantize(x, bits, 16, rotate=True)  # groups of channels, Hadamard-rotated
    h = hadamard(32)
    assert torch.allclose(fk.token_key_logits(q @ h, per_token.codes, per_token.scale, per_token.low, bits),
                          q @ dequantize(per_token).transpose(2, 3), atol=1e-4)
    assert torch.allclose(fk.token_value_sum(p, per_token.codes, per_token.scale, per_token.low, bits) @ h,
                          p @ dequantize(per_token), atol=1e-4)


def test_compiled_kernel_equals_eager():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 128, 32, generator=gen), torch.randn(1, 2, 128, 32, generator=gen)
    qk, qv = quantize(k.transpose(2, 3).contiguous(), 4, 32), quantize(v, 2, 32, rotate=True)
    q, res = torch.randn(1, 2, 3, 32, generator=gen), torch.randn(1, 2, 5, 32, generator=gen)
    args = (q, (qk.codes, qk.scale, qk.low), (qv.codes, qv.scale, qv.low), hadamard(32), res, res, None)
    settings = {"key_bits": 4, "value_bits": 2, "keys_per_channel": True}
    eager_out, eager_p = fk.quantized_attention(*args, **settings)
    out, p = fk.run(fk.quantized_attention, *args, **settings)
    assert not fk._failed, "torch.compile fell back to eager"
    assert torch.allclose(out, eager_out, atol=1e-5) and torch.allclose(p, eager_p, atol=1e-6)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.25)])
@pytest.mark.parametrize("settings", [{"bits": 4, "value_bits": 2}, {"bits": 3}, {"bits": 8, "rotate": False}])
def test_quantized_fused_equals_dequantize_then_attend(eager, dtype, atol, settings):
    # One layer: its K/V come from the embeddings alone, so both paths quantize the very same values
    # (with more layers a 1e-7 difference can flip a 2-bit code in the next layer and grow).
    model = tiny_llama(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128).to(dtype)
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(2))
    logits = {}
    for fused in (False, True):  # 20-token prefill, then 70 decode steps across three residual flushes
        with attach(model, Quantized(group=16, residual=16, fused=fused, **settings)) as cache:
            logits[fused] = _feed(model, ids, cache, 20).float()
            held = sum(t.numel() * t.element_size() for layer in cache.layers for t in reachable_tensors(layer))
            assert cache.nbytes() == held
            assert cache.layers[0].qkeys.shape[3] == 80 and cache.layers[0].keys.shape[2] == 10
    assert torch.allclose(logits[True], logits[False], atol=atol), (logits[True] - logits[False]).abs().max()
    if dtype == torch.bfloat16:  # tolerance of bf16 rounding, not of a wrong answer: greedy tokens agree
        assert (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("bits", [None, 4])
def test_inplace_heavy_hitter_keeps_exactly_the_gather_references_tokens(eager, bits):
    model = tiny_llama(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128)  # see above
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(4))
    kept, logits = {}, {}
    for inplace in (False, True):
        with attach(model, HeavyHitter(capacity=24, bits=bits, group=16, inplace=inplace)) as cache:
            logits[inplace] = _feed(model, ids, cache, 30)
            if inplace:
                layers = [layer.store_.full_precision(layer.store_.ordered(layer.text_order()))[0] for layer in cache.layers]
                held = sum(t.numel() * t.element_size() for layer in cache.layers for t in reachable_tensors(layer))
                assert cache.nbytes() == held and cache.held_tokens() == 24
            else:
                layers = [layer.materialize()[0] for layer in cache.layers]
            # a token's identity: its key (random model: keys of distinct tokens differ), order-free
            kept[inplace] = [k[..., 0].sort(-1).values for k in layers]  # (batch, kv_heads, 24) per layer
    for reference, inplace in zip(kept[False], kept[True]):
        assert torch.allclose(reference, inplace, atol=1e-5)
    assert torch.allclose(logits[True], logits[False], atol=1e-4)


def test_fused_decode_through_two_layers_keeps_greedy_tokens(eager):
    model = tiny_kv_model().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(6))
    logits = {}
    for fused in (False, True):
        with attach(model, Quantized(bits=4, value_bits=2, group=16, residual=16, fused=fused)) as cache:
            logits[fused] = _feed(model, ids, cache, 20).float()
    assert (logits[True].argmax(-1) == logits[False].argmax(-1)).float().mean() > 0.9
    assert (logits[True] - logits[False]).abs().mean() < 0.1


def test_full_budget_greedy_generation_equals_the_full_cache(eager):
    model = tiny_kv_model()
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    plain = model.generate(prompt, max_new_tokens=20, do_sample=False, past_key_values=DynamicCache())
    for name in ("heavy_hitter", "quantized"):
        with attach(model, make_policy(name, 1.0, 32, group=16)) as cache:
            same = model.generate(prompt, max_new_tokens=20, do_sample=False, past_key_values=cache)
        assert torch.equal(plain, same), name


def test_attach_routes_attention_and_restores_it(eager):
    model = tiny_kv_model()
    before = model.config._attn_implementation
    with attach(model, Quantized(bits=4, group=16, residual=16)) as cache:
        assert model.config._attn_implementation == ATTENTION_NAME
        assert getattr(model.model.layers[1].self_attn, LAYER_ATTRIBUTE) is cache.layers[1]
    assert model.config._attn_implementation == before
    assert not hasattr(model.model.layers[1].self_attn, LAYER_ATTRIBUTE)
    with attach(model, Quantized(bits=4, group=16, residual=16, fused=False)):
        assert model.config._attn_implementation == before
