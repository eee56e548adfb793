"""Swapped attention (PostNAS): equivalences, the two linear forms, bounded honest caches, export, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from leanlm.engine.decode import generate
from leanlm.errors import LeanLMError
from leanlm.kvcache.swapped import RecurrentLayer, WindowLayer
from leanlm.models import arch_of, load_model, tiny_gemma3, tiny_llama, tiny_qwen2
from leanlm.models.compact import save_compact
from leanlm.transforms import Transform
from leanlm.transforms.swap_attention import swapped_layers
from leanlm.models.swapped_attention.linear import chunked, recurrent
from leanlm.models.swapped_attention.sliding_window import window_mask

IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))


def swap(model, replacement="sliding_window", layers=(0,), **settings):
    return Transform.from_dict({"name": "swap_attention", "replacement": replacement, "layers": list(layers), **settings}).apply(model)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2, tiny_gemma3], ids=["llama", "qwen2", "gemma3"])
@torch.no_grad()
def test_window_covering_the_text_equals_full_attention(make):
    model = make(num_layers=3, num_heads=4, num_kv_heads=2)
    reference = model(IDS).logits
    # Gemma 3's own sliding layers keep their window (itself included), so the swap is exact there too.
    windows = [view.sliding_window or IDS.shape[1] for view in arch_of(model).attentions()[:2]]
    swap(model, layers=[0, 1], windows=windows, sink=0)
    assert torch.allclose(model(IDS).logits, reference, atol=1e-5)
    swap(model, layers=[0, 1], window=8, sink=2)
    assert not torch.allclose(model(IDS).logits, reference, atol=1e-3)  # a short window really changes the output


def test_window_mask_by_hand():
    mask = window_mask(torch.arange(6), torch.arange(6), sink=1, window=2)
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_linear_chunked_and_recurrent_forms_agree(chunk):
    g = torch.Generator().manual_seed(0)
    b, kv, groups, n, f, e = 2, 2, 3, 37, 8, 5
    fq, fk = torch.rand(b, kv, groups, n, f, generator=g), torch.rand(b, kv, n, f, generator=g)
    v = torch.randn(b, kv, n, e, generator=g)
    log_gate = torch.nn.functional.logsigmoid(torch.randn(b, kv, n, generator=g) + 2)
    state = torch.rand(b, kv, f, e, generator=g)
    out_c, state_c = chunked(fq, fk, v, log_gate, state, chunk)
    out_r, state_r = recurrent(fq, fk, v, log_gate, state)
    assert torch.allclose(out_c, out_r, rtol=1e-4, atol=1e-5)
    assert torch.allclose(state_c, state_r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("replacement", ["sliding_window", "linear"])
@torch.no_grad()
def test_decoding_through_the_cache_matches_recomputing_from_scratch(replacement):
    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    swap(model, replacement, layers=[0, 2], window=6, sink=2)
    prompt = IDS[:1, :20]
    engine = generate(model, prompt, 12, prefill_chunk=7)  # chunked prefill + one-token steps, bounded caches
    ids = prompt
    for _ in range(12):  # no cache at all: each step recomputes the whole text
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(engine, ids[:, 20:])


@pytest.mark.parametrize("replacement,layer_cls", [("sliding_window", WindowLayer), ("linear", RecurrentLayer)])
@torch.no_grad()
def test_swapped_cache_bytes_are_the_tensors_held_and_stay_constant(replacement, layer_cls):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    swap(model, replacement, layers=[0], window=5, sink=2)
    cache, sizes, full_sizes = DynamicCache(), [], []
    for token in torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(0)):
        model(token.view(1, 1), past_key_values=cache, use_cache=True)
        layer = cache.layers[0]
        assert isinstance(layer, layer_cls)
        held = [t for t in vars(layer).values() if isinstance(t, torch.Tensor) and t.dim() > 0]
        assert layer.nbytes() == sum(t.numel() * t.element_size() for t in held)
        sizes.append(layer.nbytes())
        full_sizes.append(cache.layers[1].keys.numel())
    assert layer.held_tokens() == 2 + 5 - 1  # sinks + the window minus the next query
    assert len(set(sizes[10:])) == 1 and sizes[10] > 0  # constant once the window is full
    assert full_sizes[-1] > full_sizes[10]  # the kept full-attention layer keeps growing


@pytest.mark.parametrize("replacement", ["sliding_window", "linear"])
@torch.no_grad()
def test_swapped_model_exports_and_reloads_with_identical_logits(tmp_path, replacement):
    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    swap(model, replacement, layers=[1], window=6)
    if replacement == "linear":  # move the new parameters off their initial values, so loading must restore them
        for p in swapped_layers(model)[1].parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_compact(model, None, tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), "float32")
    assert type(swapped_layers(loaded)[1]) is type(swapped_layers(model)[1]) and set(swapped_layers(loaded)) == {1}
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("settings,message", [
    ({"window": 0}, "window >= 1"),
    ({"layers": [0, 1]}, "keeps at least 1"),
    ({"replacement": "mamba"}, "unknown attention replacement 'mamba'"),
    ({"layers": [5]}, "cannot swap layer 5"),
])
def test_bad_settings_give_one_clear_error(settings, message):
    model = tiny_llama(num_layers=2)
    with pytest.raises(LeanLMError, match=message) as info:
        swap(model, **{"layers": [0], **settings})
    assert str(info.value).count(";") <= 1 and "\n" not in str(info.value)
    assert not swapped_layers(model)  # nothing was changed


def test_search_is_deterministic_for_a_seed_and_keeps_what_it_must():
    from leanlm.analyze.swap_search import Passkey, SearchConfig, search

    model = tiny_llama(num_layers=4, num_heads=4, num_kv_heads=2)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    passkey = Passkey(ids=list(range(10, 40)), answer=[7, 8])
    config = SearchConfig(options=("sliding_window:window=4,sink=1", "linear:window=2,sink=1"), score_from=8,
                          count=2, keep=1, fit_steps=3, seed=0)
    first, second = (search(model, windows, config, passkey) for _ in range(2))
    assert first.table == second.table and first.swapped == second.swapped and first.recipe == second.recipe
    assert len(first.swapped) == 2 and len(first.kept) == 2
    costs = {row["layer"]: row["cost"] for row in first.table}
    assert max(costs[i] for i in first.swapped) <= min(costs[int(i)] for i in first.kept)  # the cheapest went
    assert not swapped_layers(model)  # the search leaves the model as it was
    swapped = tiny_llama(num_layers=4, num_heads=4, num_kv_heads=2)
    for item in first.recipe:  # the recipe rebuilds the chosen model
        Transform.from_dict(item).apply(swapped)
    assert sorted(swapped_layers(swapped)) == first.swapped
    eps = search(model, windows, SearchConfig(options=config.options, score_from=8, epsilon=0.0, fit_steps=0), passkey,
                 table=first.table)
    assert eps.swapped == [] and len(eps.kept) == 4  # a zero KL budget swaps nothing


def test_several_passkey_prompts_score_their_mean_drop():
    from leanlm.analyze.swap_search import Passkey, SearchConfig, layer_sensitivity

    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    windows = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(6))
    prompts = [Passkey(ids=list(range(10, 40)), answer=[7, 8]), Passkey(ids=list(range(50, 90)), answer=[3])]
    config = SearchConfig(options=("sliding_window:window=4,sink=1",), score_from=8, fit_steps=0, passkey_weight=0.5)
    each = [layer_sensitivity(model, windows, config, p) for p in prompts]
    both = layer_sensitivity(model, windows, config, prompts)
    option = config.options[0]
    for layer, row in enumerate(both):
        drops = [table[layer]["options"][option]["passkey_drop"] for table in each]
        assert row["options"][option]["passkey_drop"] == pytest.approx(sum(drops) / 2, abs=1e-6)
    assert any(abs(a["options"][option]["passkey_drop"] - b["options"][option]["passkey_drop"]) > 1e-4
               for a, b in zip(*each))  # the two prompts really differ


def test_passkey_budget_skips_the_layers_that_break_retrieval_together():
    from leanlm.analyze.swap_search import SearchConfig, greedy_select

    table = [{"layer": i, "cost": c} for i, c in enumerate([0.1, 0.2, 0.3, 0.4, 0.5])]
    seen = []

    def drop(layers):  # layers 1 and 3 each break retrieval only together with layer 0
        seen.append(list(layers))
        return 1.0 if 0 in layers and (1 in layers or 3 in layers) else 0.1

    config = SearchConfig(options=("sliding_window:window=4",), count=3, keep=1, passkey_budget=0.5)
    chosen, _ = greedy_select(table, config, passkey_drop=drop)
    assert chosen == [0, 2, 4] and seen == [[0], [0, 1], [0, 2], [0, 2, 3], [0, 2, 4]]
    assert greedy_select(table, SearchConfig(options=config.options, count=3, keep=1))[0] == [0, 1, 2]  # no budget
    with pytest.raises(LeanLMError, match="passkey_budget"):
        SearchConfig(options=config.options, passkey_budget=-1.0)


@torch.no_grad()
def test_suffix_replay_equals_a_full_forward():
    from leanlm.analyze.swap_search import Suffix

    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    ids = IDS[:1]
    suffix = Suffix(model, ids)
    swap(model, "sliding_window", layers=[1], window=5)  # changed from layer 1 on: layers 1.. replayed on stored inputs
    assert torch.allclose(suffix.logits(1, 6), model(ids).logits[:, -6:], atol=1e-5)


def test_recovery_fits_then_distils_only_the_new_parameters(tmp_path):
    from leanlm.recover.config import DistillConfig
    from leanlm.recover.swap import SwapRecoverConfig, recover_swapped

    teacher = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    student = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    swap(student, "linear", layers=[1], window=2, sink=1)
    swap(student, "sliding_window", layers=[2], window=4)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    kd = DistillConfig(steps=2, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=0, checkpoint_every=0, bf16=False)
    report = recover_swapped(student, teacher, windows, windows, SwapRecoverConfig(fit_steps=15, kd=kd), str(tmp_path / "kd"))
    assert report["layers"] == [1]  # the sliding window has nothing to train
    fit = report["fits"]["1"]
    assert fit["after"] < fit["before"]  # the layer-local fit moved the replacement toward the original's outputs
    assert report["kd"]["steps"] == 2
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    new = {f"model.layers.1.self_attn.{n}" for n in swapped_layers(student)[1].new_parameters()}
    assert changed and changed <= new  # only the replacement's new parameters were trained


def test_slack_prefers_the_smaller_cache_within_the_margin():
    from leanlm.analyze.swap_search import SearchConfig, pick_option

    options = ("sliding_window:window=128", "linear", "sliding_window:window=512")
    costs = {"sliding_window:window=128": {"cost": 0.012}, "linear": {"cost": 0.011},
             "sliding_window:window=512": {"cost": 0.010}}
    assert pick_option(costs, SearchConfig(options=options)) == "sliding_window:window=512"
    assert pick_option(costs, SearchConfig(options=options, slack=0.0015)) == "linear"
    assert pick_option(costs, SearchConfig(options=options, slack=0.002)) == "sliding_window:window=128"
