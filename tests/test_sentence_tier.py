"""SentenceKV-style two-tier cache on tiny models: segmentation, exactness, honest tiers, bounded traffic."""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch
from transformers import DynamicCache

from leanlm.errors import LeanLMError
from leanlm.evaluate.kv.common import cache_total_nbytes
from leanlm.kvcache import CACHE_POLICIES, attach, make_policy
from leanlm.kvcache.sentence import (SINK, MemoryStore, MmapStore, Segmenter, SegmentState, SentenceTier,
                                          boundary_token_ids, fit_mask, segment, tier_stats)
from leanlm.models import tiny_llama

from kv_helpers import run_chunks, tiny_kv_model

CONTEXT = 96
SINKS, MAX_SENTENCE = 4, 12
BOUNDARY = torch.arange(256) % 7 == 0  # synthetic boundary table: ids divisible by 7 end a sentence


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, CONTEXT), generator=torch.Generator().manual_seed(5))


def policy(retrieve: int, **settings) -> SentenceTier:
    return SentenceTier(sink=SINKS, max_sentence=MAX_SENTENCE, retrieve=retrieve, **settings).use_boundaries(BOUNDARY)


def text_sentences(ids: torch.Tensor) -> list[int]:
    """Sentence id of every text position (SINK for the sinks), as the cache segments them."""
    rest, _ = segment(ids[..., SINKS:], BOUNDARY, MAX_SENTENCE)
    return [SINK] * SINKS + rest


def held_tensors(obj, skip=("slow", "segmenter", "queries"), seen=None) -> list[torch.Tensor]:
    """Every tensor an object holds, however nested (attributes, dicts, lists); ``skip``: attributes not followed."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = [value for name, value in vars(obj).items() if name not in skip]
    else:
        items = []
    return [t for item in items for t in held_tensors(item, skip, seen)]


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind these tensors (a view of a big tensor counts it all)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------


def test_segment_is_deterministic_whatever_the_chunking_and_covers_every_token_once():
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))
    whole, end = segment(ids, BOUNDARY, MAX_SENTENCE)
    assert segment(ids, BOUNDARY, MAX_SENTENCE) == (whole, end)
    rng = random.Random(0)
    for _ in range(5):  # the same text in random chunks, carrying the state, segments the same way
        cuts = sorted(rng.sample(range(1, 300), 12))
        state, pieces = SegmentState(), []
        for a, b in zip([0, *cuts], [*cuts, 300]):
            part, state = segment(ids[a:b], BOUNDARY, MAX_SENTENCE, state)
            pieces += part
        assert (pieces, state) == (whole, end)
    # Every token in exactly one sentence; sentences are contiguous runs numbered 0, 1, 2, ...
    assert len(whole) == len(ids) and whole[0] == 0
    assert all(b - a in (0, 1) for a, b in zip(whole, whole[1:]))
    for sentence in range(whole[-1] + 1):
        members = [i for i, s in enumerate(whole) if s == sentence]
        assert members == list(range(members[0], members[-1] + 1)) and len(members) <= MAX_SENTENCE
        last = members[-1]
        inside = [i for i in members[:-1] if BOUNDARY[ids[i]]]
        assert not inside  # a boundary token always ends its sentence
        if sentence < whole[-1]:  # closed: by a boundary token or by the length rule
            assert BOUNDARY[ids[last]] or len(members) == MAX_SENTENCE
    last_closed = bool(BOUNDARY[ids[-1]]) or whole.count(whole[-1]) == MAX_SENTENCE
    assert end == (SegmentState(whole[-1] + 1, 0) if last_closed else SegmentState(whole[-1], whole.count(whole[-1])))


def test_segment_rules_on_a_hand_made_stream():
    table = torch.zeros(10, dtype=torch.bool)
    table[9] = True  # token 9 is "."
    out, state = segment([1, 9, 2, 3, 4, 5, 9, 1], table, max_len=3)
    assert out == [0, 0, 1, 1, 1, 2, 2, 3] and state == SegmentState(3, 1)
    # A batch shares one segmentation: a boundary in any row closes the sentence for all rows.
    out, _ = segment(torch.tensor([[1, 9, 1, 1], [1, 1, 9, 1]]), table, max_len=8)
    assert out == [0, 0, 1, 2]
    assert segment([1, 2, 3, 4, 5], None, max_len=2)[0] == [0, 0, 1, 1, 2]
    with pytest.raises(LeanLMError):
        segment([12], table, max_len=2)


def test_segmenter_puts_the_first_tokens_in_the_sinks_and_follows_the_steps():
    segmenter = Segmenter(BOUNDARY, MAX_SENTENCE, sink=4)
    segmenter.observe(torch.tensor([[1, 2, 3]]))
    assert segmenter.sentence_ids(0, 3) == [SINK] * 3
    segmenter.observe(torch.tensor([[1, 7, 1]]))  # the 4th token is the last sink; 7 ends sentence 0
    assert segmenter.sentence_ids(3, 3) == [SINK, 0, 1] and segmenter.closed == 1
    assert segmenter.sentence_ids(6, 2) == [1, 1]  # no ids observed: the length rule only
    with pytest.raises(LeanLMError):
        segmenter.sentence_ids(20, 1)


def test_boundary_table_from_a_tokenizer():
    class Tokenizer:
        pieces = ["Hello", " world", ".", " Really", "?!", "\n", " Mr", ". ", "3", "ok"]

        def __len__(self):
            return len(self.pieces)

        def batch_decode(self, batch):
            return [self.pieces[i] for (i,) in batch]

    assert boundary_token_ids(Tokenizer()).tolist() == [False, False, True, False, True, True, False, True, False, False]


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [8, 1])
@pytest.mark.parametrize("settings", [{}, {"store": "mmap"}, {"summary": "pca"}])
def test_retrieving_every_sentence_reproduces_the_full_cache_exactly(model, ids, chunk, settings):
    reference = run_chunks(model, ids, DynamicCache(), chunk)
    with attach(model, policy(retrieve=CONTEXT, **settings)) as cache:
        logits = run_chunks(model, ids, cache, chunk)
        assert len(cache.layers[0].lengths) > 5  # many sentences were really closed and stored
    assert torch.equal(logits, reference)


def test_a_batch_shares_one_segmentation_and_stays_exact(model):
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(9))
    reference = run_chunks(model, ids, DynamicCache(), 8)
    with attach(model, policy(retrieve=48)) as cache:
        assert torch.equal(run_chunks(model, ids, cache, 8), reference)


def test_generate_with_every_sentence_retrievable_matches_plain_generate(model, ids):
    prompt = ids[:, :30]
    plain = model.generate(prompt, max_new_tokens=20, do_sample=False)
    with attach(model, policy(retrieve=CONTEXT)) as cache:
        same = model.generate(prompt, max_new_tokens=20, do_sample=False, past_key_values=cache)
        assert cache.layers[0].segmenter.position == 49  # the prompt and every generated token but the last
    assert torch.equal(plain, same)
    assert not model.model._forward_pre_hooks and not model.model.layers[0].self_attn._forward_pre_hooks
    with attach(model, policy(retrieve=1)) as cache:
        small = model.generate(prompt, max_new_tokens=20, do_sample=False, past_key_values=cache)
        assert cache.layers[0].fetched_bytes > 0 and cache.held_tokens() < 49
    assert small.shape == plain.shape


def test_eager_attention_gets_an_additive_mask_of_the_right_size(ids):
    """sdpa takes a boolean mask, eager an additive float one: both resized, same attention."""
    runs = {}
    for implementation in ("sdpa", "eager"):
        model = tiny_kv_model()
        model.set_attn_implementation(implementation)
        with attach(model, policy(retrieve=2)) as cache:
            runs[implementation] = run_chunks(model, ids, cache, 8)
    assert torch.allclose(runs["sdpa"], runs["eager"], atol=1e-4)


def test_small_budget_attends_to_exactly_sinks_retrieved_sentences_and_the_open_one(ids):
    """One layer: the run equals a full cache whose mask hides every sentence that was not retrieved."""
    model = tiny_llama(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128)
    chunk = 8  # several queries per step: the per-layer mask resizing is exercised
    with attach(model, policy(retrieve=2)) as cache:
        logits = run_chunks(model, ids, cache, chunk)
        log = cache.layers[0].log
    sentences = text_sentences(ids)
    reference, full = [], DynamicCache()
    with torch.no_grad():
        for step, start in enumerate(range(0, CONTEXT, chunk)):
            closed = segment(ids[..., SINKS:start], BOUNDARY, MAX_SENTENCE)[1].sentence if start > SINKS else 0
            seen = [s == SINK or s in log[step].attended or s >= closed for s in sentences[:start]]
            causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
            mask = torch.cat([torch.tensor(seen, dtype=torch.bool).expand(chunk, -1), causal], dim=1)[None, None]
            positions = torch.arange(start, start + chunk)[None]
            out = model(ids[:, start:start + chunk], past_key_values=full, attention_mask=mask,
                        position_ids=positions, use_cache=True)
            reference.append(out.logits)
    assert any(len(entry.attended) == 2 for entry in log)
    assert torch.allclose(logits, torch.cat(reference, dim=1), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Honest tiers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "mmap"])
def test_tier_bytes_equal_the_tensors_held(model, ids, store):
    with attach(model, policy(retrieve=2, store=store)) as cache:
        run_chunks(model, ids, cache, 8)
        run_chunks(model, ids[:, :20], cache, 1)  # and some decoding
        for layer in cache.layers:
            assert layer.nbytes() == layer.fast_nbytes() == storage_bytes(held_tensors(layer))
            closed_bytes = sum(n * 2 * 2 * 32 * 4 for n in layer.lengths)  # K+V × kv_heads × head_dim × fp32
            assert layer.slow_nbytes() == closed_bytes  # every closed sentence is in the slow tier
            if store == "memory":
                assert storage_bytes(held_tensors(layer.slow, skip=())) == closed_bytes
            else:
                assert os.path.getsize(layer.slow.path) == closed_bytes
        stats = tier_stats(cache)
        assert stats.fast_bytes == cache.nbytes() and stats.slow_bytes == sum(l.slow_nbytes() for l in cache.layers)


def test_sentences_not_retrieved_are_not_in_fast_memory(model, ids):
    reference = DynamicCache()
    run_chunks(model, ids, reference, 1)
    keys = reference.layers[0].keys[0, 0]  # (tokens, head_dim): layer 0's keys depend on token + position only
    with attach(model, policy(retrieve=2)) as cache:
        run_chunks(model, ids, cache, 1)
        layer = cache.layers[0]
        fast = [t for t in held_tensors(layer) if t.dim() == 4 and t.shape[-1] == 32]
        rows = torch.cat([t[0, 0].reshape(-1, 32) for t in fast])  # every head-0 vector the fast tier holds
        sentences = text_sentences(ids)
        for sentence in range(len(layer.lengths)):
            tokens = keys[[i for i, s in enumerate(sentences) if s == sentence]]
            present = (tokens[:, None] == rows[None]).all(-1).any(-1)  # (tokens,)
            expected = sentence in layer.resident
            assert present.tolist() == [expected] * len(tokens)  # resident whole, or not held at all
            assert torch.equal(layer.slow.get(sentence, "cpu")[0][0, 0], tokens)  # but the slow tier has it
        assert 0 < len(layer.resident) <= 2 < len(layer.lengths)


@pytest.mark.parametrize("store", ["memory", "mmap"])
def test_small_budget_bounds_resident_tokens_and_traffic_per_step(model, ids, store):
    retrieve = 2
    per_token = 2 * 2 * 32 * 4  # K+V × kv_heads × head_dim × fp32, batch 1
    with attach(model, policy(retrieve=retrieve, store=store)) as cache:
        run_chunks(model, ids[:, :40], cache, 8)
        for step in range(40, CONTEXT):
            run_chunks(model, ids[:, step:step + 1], cache, 1)
            for layer in cache.layers:
                open_tokens = 0 if layer.open_k is None else layer.open_k.shape[2]
                assert len(layer.resident) <= retrieve
                assert layer.held_tokens() <= SINKS + retrieve * MAX_SENTENCE + open_tokens
                entry = layer.log[-1]
                assert entry.fetched <= retrieve * MAX_SENTENCE * per_token
                assert entry.written <= MAX_SENTENCE * per_token
        stats = tier_stats(cache)
        assert stats.decode_steps == CONTEXT - 40 and stats.fetched_bytes > 0
        assert 0 < stats.moved_per_decode_token <= 2 * (retrieve + 1) * MAX_SENTENCE * per_token
        full = DynamicCache()
        run_chunks(model, ids, full, 8)
        full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
        assert cache.nbytes() < 0.6 * full_bytes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mmap_store_round_trips_bit_exactly(tmp_path, dtype):
    store = MmapStore(str(tmp_path))
    sentences = {}
    for sentence in range(6):
        keys = torch.randn(1, 3, 5 + sentence, 64).to(dtype)
        values = torch.randn(1, 3, 5 + sentence, 64).to(dtype)
        keys[0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
        store.put(sentence, keys, values)
        sentences[sentence] = keys, values
        got = store.get(sentence // 2, "cpu")  # reads between writes: the map follows the growing file
        assert got[0].dtype == dtype
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    for sentence, (keys, values) in sentences.items():
        got_k, got_v = store.get(sentence, "cpu")
        assert torch.equal(got_k.view(bits), keys.view(bits)) and torch.equal(got_v.view(bits), values.view(bits))
    assert os.path.getsize(store.path) == store.nbytes() == sum(2 * k.nbytes for k, _ in sentences.values())
    path = store.path
    del store
    gc.collect()
    assert not os.path.exists(path)  # the slow-tier file goes with its store


def test_memory_store_returns_copies():
    store = MemoryStore()
    keys = torch.randn(1, 2, 3, 4)
    store.put(0, keys, keys + 1)
    got, _ = store.get(0, "cpu")
    assert torch.equal(got, keys) and got.data_ptr() != keys.data_ptr()
    assert got.data_ptr() != store.sentences[0][0].data_ptr() and store.nbytes() == 2 * keys.nbytes


# ---------------------------------------------------------------------------------------------
# Masks, budgets, settings
# ---------------------------------------------------------------------------------------------


def test_fit_mask_resizes_the_past_and_keeps_the_causal_part():
    assert fit_mask(None, held=5, q_len=1) is None and fit_mask(None, held=0, q_len=3) is None
    built = fit_mask(None, held=2, q_len=3)[0, 0]
    assert built.tolist() == [[True, True, True, False, False], [True, True, True, True, False], [True] * 5]
    old = torch.ones(1, 1, 3, 7, dtype=torch.bool)
    old[..., 4:] = torch.ones(3, 3, dtype=torch.bool).tril()
    assert torch.equal(fit_mask(old, held=2, q_len=3)[0, 0], built)
    additive = torch.zeros(1, 1, 3, 7).masked_fill(~old, float("-inf"))
    assert torch.equal(fit_mask(additive, held=2, q_len=3)[0, 0] == 0, built)
    padded = old.clone()
    padded[..., 0] = False
    with pytest.raises(LeanLMError):
        fit_mask(padded, held=2, q_len=3)


def test_for_budget_gives_the_fast_tier_the_budget_and_no_sentence_count_bound():
    exact = make_policy("sentence_tier", 1.0, 500)
    assert (exact.retrieve, exact.budget_tokens, exact.capacity) == (500, None, None)  # every sentence: exact
    policy = make_policy("sentence_tier", 0.25, 2048)
    assert (policy.budget_tokens, policy.retrieve, policy.capacity) == (512, 2048, None)
    assert "sentence_tier" in CACHE_POLICIES


def narrative(sentences: int, seed: int = 0) -> torch.Tensor:
    """(1, n) byte ids of short sentences of 2-4 words (at most 29 bytes each), ending in . ! or ?"""
    rng = random.Random(seed)
    words = ["he", "said", "no", "the", "old", "boat", "came", "late", "she", "ran", "to", "sea", "why", "yes"]
    text = "".join(" ".join(rng.choice(words) for _ in range(rng.randint(2, 4))) + rng.choice(".!?") + " "
                   for _ in range(sentences))
    return torch.tensor([list(text.encode())])


BYTE_BOUNDARY = torch.zeros(256, dtype=torch.bool)
BYTE_BOUNDARY[[ord("."), ord("!"), ord("?"), ord("\n")]] = True


@pytest.mark.parametrize("chunk", [16, 512])  # streamed, and one prefill forward (the continuation protocol)
def test_the_budget_sizes_the_fast_tier_from_what_it_really_holds(model, chunk):
    ids = narrative(60)[:, :512]  # sentences of ~15 bytes: far from the 64-token maximum
    budget = 0.25
    policy = SentenceTier.for_budget(budget, 512, index="keys").use_boundaries(BYTE_BOUNDARY)
    with attach(model, policy) as cache:
        run_chunks(model, ids, cache, chunk)
        token_bytes = 2 * 2 * 32 * 4  # K and V x kv_heads x head_dim x fp32, one token of one layer
        for layer in cache.layers:
            fast = storage_bytes(held_tensors(layer))
            assert layer.fast_nbytes() == fast
            assert 0.8 * budget * 512 * token_bytes <= fast <= budget * 512 * token_bytes
        slow = sum(storage_bytes(held_tensors(layer.slow, skip=())) for layer in cache.layers)
        assert slow == sum(layer.slow_nbytes() for layer in cache.layers) > 0
        assert cache_total_nbytes(cache) == cache.nbytes() + slow


def test_a_budget_with_no_room_to_fetch_keeps_only_sinks_open_sentence_and_summaries(model):
    ids = narrative(60)[:, :256]
    policy = SentenceTier.for_budget(0.03, 256, index="keys").use_boundaries(BYTE_BOUNDARY)  # 7.7 tokens
    with attach(model, policy) as cache:
        run_chunks(model, ids, cache, 16)
        for layer in cache.layers:
            assert layer.room() == 0 and not layer.resident


def test_resident_sentences_never_exceed_the_token_capacity(model, ids):
    with attach(model, policy(retrieve=50, capacity=20)) as cache:
        for start in range(0, CONTEXT, 8):
            run_chunks(model, ids[:, start:start + 8], cache, 8)
            for layer in cache.layers:
                assert sum(k.shape[2] for k, _ in layer.resident.values()) <= 20
                attended = layer.log[-1].attended
                assert sum(layer.lengths[s] for s in attended) <= 20
        assert max(len(layer.log[-1].attended) for layer in cache.layers) >= 2


@pytest.mark.parametrize("bad", [
    lambda: SentenceTier(max_sentence=0),
    lambda: SentenceTier(retrieve=-1),
    lambda: SentenceTier(summary="median"),
    lambda: SentenceTier(store="tape"),
    lambda: make_policy("sentence_tier+int4", 0.5, 256),
])
def test_bad_settings_raise_one_clear_error(bad):
    with pytest.raises(LeanLMError):
        bad()


def test_describe_names_the_boundary_source():
    assert SentenceTier().describe()["boundaries"] == "length only"
    assert policy(retrieve=2).describe()["boundaries"] == "tokenizer table"
