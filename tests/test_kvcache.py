"""Run-time KV-cache policies on tiny models: exactness at full budget, honest bytes, the keep rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from leanlm.errors import LeanLMError
from leanlm.kvcache import CACHE_POLICIES, HeavyHitter, ObservationWindow, Quantized, SinkWindow, attach, make_policy
from leanlm.kvcache.eviction import attention_probs, recent_and_top
from leanlm.kvcache.heavy_hitter import HeavyHitterLayer
from leanlm.kvcache.quant import QuantizedTensor, dequantize, error_bound, hadamard, pack, quantize, unpack
from leanlm.models import tiny_llama
from leanlm.kvcache.sink_window import rerotate

from kv_helpers import run_chunks as feed_chunks

CONTEXT = 64
CHUNK = 8
EVICTING = ["sink_window", "heavy_hitter", "observation_window"]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, CONTEXT), generator=torch.Generator().manual_seed(3))


def run_chunks(model, ids, cache, chunk=CHUNK):
    return feed_chunks(model, ids, cache, chunk)


def reachable_tensors(obj, seen=None) -> list[torch.Tensor]:
    """Every tensor an object holds, however nested (attributes, lists, QuantizedTensor)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in reachable_tensors(item, seen)]
    if isinstance(obj, QuantizedTensor) or hasattr(obj, "__dict__"):
        found = []
        for name, value in vars(obj).items():
            if name in ("inv_freq", "queries"):  # model's rotary table; this step's queries (cleared each step)
                continue
            found += reachable_tensors(value, seen)
        return found
    return []


@pytest.mark.parametrize("name", sorted(CACHE_POLICIES))
def test_full_budget_reproduces_uncompressed_logits_exactly(model, ids, name):
    reference = run_chunks(model, ids, DynamicCache())
    with attach(model, make_policy(name, 1.0, CONTEXT, model=model, group=16)) as cache:
        logits = run_chunks(model, ids, cache)
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("name", EVICTING + ["quantized", "quantized:bits=4,value_bits=3", "heavy_hitter+int4",
                                          "heavy_hitter+int3", "sink_window+int8"])
def test_nbytes_equals_the_tensors_actually_held_and_respects_the_budget(model, ids, name):
    settings = {"residual": 16} if name == "quantized" else {}
    with attach(model, make_policy(name, 0.25, CONTEXT, model=model, group=16, **settings)) as cache:
        run_chunks(model, ids, cache)
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in reachable_tensors(layer))
        assert cache.nbytes() == held
        full = DynamicCache()
        run_chunks(model, ids, full)
        full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
        # A policy that only masked tokens would still hold every byte of the full cache.
        assert held < 0.45 * full_bytes
        assert cache.peak_nbytes() >= cache.nbytes()


def test_sink_window_never_holds_more_than_sink_plus_window_and_keeps_the_named_tokens(model, ids):
    sink, window = 4, 12
    reference = DynamicCache()
    with attach(model, SinkWindow(sink=sink, window=window)) as cache:
        for step in range(CONTEXT):
            run_chunks(model, ids[:, step:step + 1], cache, chunk=1)
            run_chunks(model, ids[:, step:step + 1], reference, chunk=1)
            assert cache.held_tokens() <= sink + window
        keep = list(range(sink)) + list(range(CONTEXT - window, CONTEXT))
        # Layer 0's K/V depend only on the token and its position, so they must be the very same
        # numbers as the full cache's at the kept positions (deeper layers saw a shorter context).
        layer, full = cache.layers[0], reference.layers[0]
        assert torch.equal(layer.held.keys, full.keys[:, :, keep])
        assert torch.equal(layer.held.values, full.values[:, :, keep])
        assert all(layer.held_tokens() == sink + window for layer in cache.layers)


def test_rerotate_moves_a_key_to_another_position(model):
    rotary = model.model.rotary_emb
    key = torch.randn(1, 1, 1, 32)
    def at(position):  # noqa: E306
        cos, sin = rotary(key, torch.tensor([[position]]))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        return apply_rotary_pos_emb(key, key, cos, sin)[1]
    assert torch.allclose(rerotate(at(40), -33, rotary.inv_freq), at(7), atol=1e-5)


def test_sink_window_cache_positions_match_a_model_that_only_saw_the_kept_tokens(model, ids):
    """In cache-position mode the kept tokens behave as if they had always sat in their slots."""
    sink, window = 2, 10
    with attach(model, SinkWindow(sink=sink, window=window, position_mode="cache")) as cache:
        run_chunks(model, ids[:, :30], cache, chunk=1)
        assert cache.next_position_ids(1)[0, 0].item() == sink + window
        keys = torch.stack([layer.held.keys for layer in cache.layers])
    kept = torch.cat([ids[:, :sink], ids[:, 30 - window:30]], dim=1)
    fresh = DynamicCache()
    with torch.no_grad():
        model(kept, past_key_values=fresh, use_cache=True)
    # Layer 0's keys depend only on the token and its position: exact up to the rotation's rounding.
    assert torch.allclose(keys[0], fresh.layers[0].keys, atol=1e-5)


def test_recent_and_top_on_a_hand_made_score_matrix():
    scores = torch.tensor([[[5.0, 0.1, 3.0, 0.2, 9.0, 0.0, 0.0, 0.0]]])
    # 2 recent (6, 7) + the 3 best older ones (4, 0, 2)
    assert recent_and_top(scores, capacity=5, recent=2).tolist() == [[[0, 2, 4, 6, 7]]]


def test_attention_probs_is_causal_and_sums_over_the_group():
    keys = torch.eye(4).view(1, 1, 4, 4) * 20  # token j's key points along axis j
    queries = torch.zeros(1, 2, 2, 4)  # 2 query heads share the KV head, 2 new tokens (the last 2 keys)
    queries[0, :, 0, 3] = 20  # first new query wants token 3, which is in its future: masked
    queries[0, :, 1, 1] = 20  # second new query wants token 1
    probs = attention_probs(queries, keys, new=2)
    assert probs.shape == (1, 1, 4)
    assert probs[0, 0, 3] < 1e-3 * 2  # only the second query may see token 3 and it barely looks
    assert probs[0, 0, 1] > 1.9  # both heads of the second query put ~all mass on token 1
    assert torch.allclose(probs.sum(), torch.tensor(4.0))  # 2 heads x 2 queries, each a distribution


def test_heavy_hitter_keeps_the_tokens_that_received_the_most_attention():
    layer = HeavyHitterLayer(capacity=4, recent=2, bits=None, group=32)
    keys = torch.eye(8).view(1, 1, 8, 8) * 30
    queries = torch.zeros(1, 1, 8, 8)
    queries[0, 0, 5:, 1] = 30  # the last three queries attend to token 1
    queries[0, 0, 6:, 3] = 31  # ... and the last two prefer token 3
    layer.queries = queries
    layer.update(keys, keys.clone())
    # Token 0 collects the first query's whole mass, but 1 and 3 collect more; 6 and 7 are recent.
    assert layer.held_tokens() == 4
    kept = layer.held.keys[0, 0].argmax(dim=-1).tolist()
    assert kept == [1, 3, 6, 7]


def test_observation_window_keeps_what_the_last_queries_look_at(model):
    policy = ObservationWindow(capacity=6, window=2, kernel=1)
    layer = policy.make_layer(0, model)
    keys = torch.eye(10).view(1, 1, 10, 10) * 30
    queries = torch.zeros(1, 1, 10, 10)
    queries[0, 0, -2:, 2] = 30  # the observation window looks at tokens 2 ...
    queries[0, 0, -2:, 5] = 29  # ... and 5; earlier queries (ignored) look at token 0
    queries[0, 0, :-2, 0] = 30
    layer.queries = queries
    layer.update(keys, keys.clone())
    kept = layer.held.keys[0, 0].argmax(dim=-1).tolist()
    assert kept[-2:] == [8, 9] and 2 in kept and 5 in kept and len(kept) == 6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_dequantize_error_within_the_analytic_bound(bits):
    x = torch.randn(3, 2, 40, 64) * torch.linspace(0.1, 4, 64)  # channels of different scales
    for dtype in (torch.float32, torch.bfloat16):
        q = quantize(x.to(dtype), bits, group=32)
        error = (dequantize(q).float() - x.to(dtype).float()).abs()
        assert (error <= error_bound(x.to(dtype), bits, 32)).all()
        assert q.codes.numel() == x.numel() * bits // 8  # really packed


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, bits), bits), codes)


def test_three_bit_codes_pack_eight_in_three_bytes_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))  # 24 bits
    assert pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


def test_hadamard_is_orthonormal_and_its_own_inverse():
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    assert set((h * 8).unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(LeanLMError, match="power-of-2"):
        hadamard(48)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rotated_quantization_error_within_the_bound_of_the_rotated_vector(bits):
    # The rotation is orthonormal: the error's norm is the rotated vector's quantization error's norm.
    x = torch.randn(2, 3, 40, 64) * torch.linspace(0.1, 4, 64)
    error = dequantize(quantize(x, bits, 32, rotate=True)) - x
    bound = error_bound(x @ hadamard(64), bits, 32)
    assert (error.norm(dim=-1) <= bound.norm(dim=-1) * (1 + 1e-5)).all()


def test_rotation_spreads_an_outlier_channel_so_per_token_codes_lose_less():
    # A KV vector with one huge channel: unrotated, the outlier sets every group's step; rotated, it is spread.
    x = torch.randn(500, 64)
    x[:, 7] = 40.0
    plain = (dequantize(quantize(x, 3, 64)) - x).norm()
    rotated = (dequantize(quantize(x, 3, 64, rotate=True)) - x).norm()
    assert rotated < 0.5 * plain


def test_quantized_policy_keeps_recent_tokens_exact_and_older_ones_packed(model, ids):
    policy = Quantized(bits=4, group=16, residual=16)
    with attach(model, policy) as cache:
        run_chunks(model, ids[:, :40], cache)
        layer = cache.layers[0]
        assert layer.held_tokens() == 40
        assert layer.qkeys.shape[3] == 32 and layer.keys.shape[2] == 8  # two full residuals quantized
        reference = DynamicCache()
        run_chunks(model, ids[:, :40], reference)
        assert torch.equal(layer.keys, reference.layers[0].keys[:, :, 32:])  # the residual is exact


def test_generate_accepts_a_policy_cache(model, ids):
    prompt = ids[:1, :16]
    plain = model.generate(prompt, max_new_tokens=12, do_sample=False)
    with attach(model, SinkWindow(sink=2, window=40)) as cache:
        same = model.generate(prompt, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(plain, same)
    with attach(model, HeavyHitter(capacity=10)) as cache:
        small = model.generate(prompt, max_new_tokens=12, do_sample=False, past_key_values=cache)
        assert cache.held_tokens() == 10
    assert small.shape == plain.shape


def test_hooks_are_removed_after_attach(model):
    with attach(model, HeavyHitter(capacity=8, inplace=False)):  # the gather reference captures queries by hook
        assert model.model.layers[0].self_attn._forward_pre_hooks
    assert not model.model.layers[0].self_attn._forward_pre_hooks
    with attach(model, HeavyHitter(capacity=8)):  # the in-place one routes attention instead (test_kv_fused)
        assert model.config._attn_implementation == "leanlm_kv"
    assert model.config._attn_implementation != "leanlm_kv"


@pytest.mark.parametrize("bad", [
    lambda: make_policy("nope", 0.5, 64),
    lambda: make_policy("sink_window", 1.5, 64),
    lambda: make_policy("quantized+int4", 0.5, 64),
    lambda: Quantized(bits=5),
    lambda: make_policy("quantized:bits=3,group=4", 0.5, 64),  # 3-bit codes pack 8 at a time
    lambda: SinkWindow(window=0),
])
def test_bad_settings_raise_one_clear_error(bad):
    with pytest.raises(LeanLMError):
        bad()


def test_every_policy_describes_itself():
    for name in CACHE_POLICIES:
        described = make_policy(name, 0.5, 256, head_dim=16).describe()
        assert described["policy"] == name
        assert set(f.name for f in dataclasses.fields(CACHE_POLICIES[name])) <= set(described)


def test_quantized_budget_picks_the_most_bits_that_fit_and_measured_bytes_agree(model, ids):
    # Groups of 16 values carry 4 bytes of float16 scale and low: 0.25 byte per value on top of the
    # codes, and the 16-token residual is exact. 4/4 bits would need 0.53 of the bytes; 4/2 needs 0.48.
    policy = make_policy("quantized", 0.5, CONTEXT, group=16, residual=16)
    assert (policy.bits, policy.value_bits) == (4, 2)
    assert policy.nominal_fraction(CONTEXT) == pytest.approx((48 * 1.25 + 16 * 4) / (64 * 4))
    with attach(model, policy) as cache:
        run_chunks(model, ids, cache)
        bf16_bytes = (
            2 * 2 * model.config.num_hidden_layers * ids.shape[0] * 2 * CONTEXT * 32)  # bytes × K,V × layers × batch × kv heads × tokens × dim
        # All 64 tokens sit in four full 16-token residuals, so all are quantized: 1.25 bytes per K+V pair.
        assert cache.held_tokens() == CONTEXT
        assert cache.nbytes() / bf16_bytes == pytest.approx(1.25 / 4)
        assert cache.nbytes() / bf16_bytes <= policy.nominal_fraction(CONTEXT)  # the nominal bound holds


def test_quantized_for_budget_picks_the_most_bits_that_fit_and_honours_given_widths():
    # At 2,048 tokens the 64-token exact residual counts: 4-bit K + 2-bit V in groups of 64 fits 1/4.
    chosen = make_policy("quantized", 0.25, 2048)
    assert (chosen.bits, chosen.value_bits, chosen.group) == (4, 2, 64)
    assert chosen.nominal_fraction(2048) <= 0.25 and chosen.rotate
    given = make_policy("quantized:bits=4,value_bits=3,group=64", 0.25, 2048)
    assert (given.bits, given.value_bits, given.group) == (4, 3, 64)  # over the budget by its residual
    assert make_policy("quantized:bits=4", 1.0, 2048).bits == 16  # a full budget keeps everything


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", ["heavy_hitter", "heavy_hitter+int4:group=64"])
def test_heavy_hitter_bytes_with_its_scores_stay_within_the_budget(name, head_dim):
    # bf16 K/V: the float32 scores must fit in the budget too, sized with the model's own head_dim.
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=head_dim, hidden_size=128).to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 256), generator=torch.Generator().manual_seed(1))
    with attach(model, make_policy(name, 0.125, 256, model=model)) as cache:
        run_chunks(model, ids, cache, 32)
        full_bf16 = 2 * 2 * 2 * head_dim * 2 * 256  # layers x kv_heads x (K, V) x head_dim x bytes x tokens
        assert 0.9 * 0.125 * full_bf16 < cache.nbytes() <= 0.125 * full_bf16


@pytest.mark.parametrize("head_dim, tokens", [(32, 496), (64, 504), (128, 508)])
def test_heavy_hitter_is_sized_with_the_models_head_dim(head_dim, tokens):
    # 0.125 x 4096 tokens of bf16 K/V, each token also holding a 4-byte score per KV head:
    # floor(512 x 4 head_dim / (4 head_dim + 4)) = 496, 504, 508 for head_dim 32, 64, 128.
    config = tiny_llama(num_layers=1, num_heads=2, head_dim=head_dim, hidden_size=64).config
    assert config.hidden_size // config.num_attention_heads == 32  # so 64 and 128 come from config.head_dim
    assert make_policy("heavy_hitter", 0.125, 4096, model=config).capacity == tokens
    with pytest.raises(LeanLMError, match="head_dim"):
        make_policy("heavy_hitter", 0.125, 4096)  # no model: the sizing cannot guess head_dim
