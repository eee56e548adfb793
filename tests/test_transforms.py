"""Structural transforms: removal equals masking, models really shrink, and every result reloads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from leanlm.errors import LeanLMError
from leanlm.evaluate.memory import measured_kv_bytes_per_token, param_count
from leanlm.models import ModelSpec, tiny_llama
from leanlm.transforms import (
    TRANSFORMS,
    PruneHeads,
    PruneLayers,
    PruneMLP,
    block_influence,
    channel_scores,
    is_compact,
    load_compact,
    mask_channels,
    mask_heads,
    maybe_load_compact,
    pad_heads,
    prune_heads,
    prune_layers,
    prune_mlp,
    removed_fraction,
    save_compact,
    select_channels,
    select_heads,
)

HIDDEN, HEAD_DIM = 64, 16  # tiny_llama defaults


def logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


def random_scores(spec: ModelSpec, seed: int = 0) -> SimpleNamespace:
    """A HeadScores-like object; per_kv_group is the sum of its query heads' scores."""
    gen = torch.Generator().manual_seed(seed)
    per_head = [torch.rand(n, generator=gen).tolist() for n in spec.heads_per_layer]
    per_kv = [
        [sum(heads[g * (len(heads) // kv) : (g + 1) * (len(heads) // kv)]) for g in range(kv)]
        for heads, kv in zip(per_head, spec.kv_heads_per_layer)
    ]
    return SimpleNamespace(per_head=per_head, per_kv_group=per_kv, scorer="random")


def make_model(kind: str):
    if kind == "gqa":
        return tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    return tiny_llama(num_layers=2, num_heads=4, num_kv_heads=None)


# ---------------------------------------------------------------- head selection


TABLE = SimpleNamespace(
    per_head=[[0.9, 0.1, 0.8, 0.7], [0.2, 0.3, 0.5, 0.6]],  # 2 layers x 4 query heads
    per_kv_group=[[1.0, 1.5], [0.5, 1.1]],  # 2 KV groups per layer (heads 0-1 and 2-3)
    scorer="hand",
)


@pytest.mark.parametrize(
    "fraction, layout, granularity, expected",
    [
        # Query steps: layer 0 -> heads {1, 3} (mean 0.4), layer 1 -> heads {0, 2} (mean 0.35).
        (0.25, "global", "query", {1: [0, 2]}),
        (0.5, "global", "query", {0: [1, 3], 1: [0, 2]}),
        (0.5, "uniform", "query", {0: [1, 3], 1: [0, 2]}),
        # Group steps: the cheapest group is layer 1's first (0.5), then layer 0's first (1.0).
        (0.25, "global", "kv_group", {1: [0, 1]}),
        (0.5, "global", "kv_group", {0: [0, 1], 1: [0, 1]}),
        (0.0, "global", "query", {}),
    ],
)
def test_select_heads_picks_the_lowest_units(fraction, layout, granularity, expected):
    assert select_heads(TABLE, fraction, layout, granularity) == expected


def test_select_heads_mha_removes_single_heads():
    scores = SimpleNamespace(per_head=[[0.4, 0.1, 0.3, 0.2]], per_kv_group=[[0.4, 0.1, 0.3, 0.2]])
    assert select_heads(scores, 0.5, "global", "query") == {0: [1, 3]}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_fraction_outside_range_is_an_error(fraction):
    with pytest.raises(LeanLMError, match=r"\[0, 1\)"):
        select_heads(TABLE, fraction)
    with pytest.raises(LeanLMError):
        PruneHeads(fraction=fraction)


@pytest.mark.parametrize("layout", ["global", "uniform"])
def test_fraction_that_empties_a_layer_is_an_error(layout):
    # With 2 heads per group, query granularity keeps at least one head per group: 0.8 is too much.
    with pytest.raises(LeanLMError, match="pruning every head of layer"):
        select_heads(TABLE, 0.8, layout, "query")


def test_prune_heads_refuses_bad_removals(tiny_gqa):
    with pytest.raises(LeanLMError, match="pruning every head of layer 0"):
        prune_heads(tiny_gqa, {0: [0, 1, 2, 3]})
    with pytest.raises(LeanLMError, match="same number in every group"):
        prune_heads(tiny_gqa, {0: [0]})
    with pytest.raises(LeanLMError, match="does not exist"):
        prune_heads(tiny_gqa, {0: [7]})


# ---------------------------------------------------------------- head removal


@pytest.mark.parametrize("kind", ["gqa", "mha"])
def test_pruning_zero_heads_is_the_identity(kind, random_ids):
    model = make_model(kind)
    before = logits(model, random_ids)
    remove = select_heads(random_scores(ModelSpec.from_model(model)), 0.0)
    prune_heads(model, remove)
    assert remove == {}
    assert torch.equal(logits(model, random_ids), before)
    assert not is_compact(model.config)


@pytest.mark.parametrize("kind", ["gqa", "mha"])
@pytest.mark.parametrize("granularity", ["query", "kv_group"])
@pytest.mark.parametrize("layout", ["global", "uniform"])
def test_removing_heads_equals_masking_them(kind, granularity, layout, random_ids):
    model = make_model(kind)
    spec = ModelSpec.from_model(model)
    remove = select_heads(random_scores(spec), 0.4, layout, granularity, spec)
    assert remove, "the test must remove something"
    with mask_heads(model, remove):
        masked = logits(model, random_ids)
    params, kv_bytes = param_count(model), measured_kv_bytes_per_token(model)

    prune_heads(model, remove)
    after = ModelSpec.from_model(model)
    torch.testing.assert_close(logits(model, random_ids), masked, atol=1e-5, rtol=0)

    # Each query head is head_dim rows of q_proj and head_dim columns of o_proj; a KV head is
    # head_dim rows of k_proj and of v_proj.
    heads_gone = spec.total_heads - after.total_heads
    kv_gone = spec.total_kv_heads - after.total_kv_heads
    assert heads_gone == sum(map(len, remove.values()))
    assert params - param_count(model) == (heads_gone + kv_gone) * 2 * HIDDEN * HEAD_DIM
    # The KV cache shrinks exactly when whole groups go (always, for MHA).
    whole_groups = granularity == "kv_group" or kind == "mha"
    assert (kv_gone > 0) == whole_groups
    assert measured_kv_bytes_per_token(model) == pytest.approx(kv_bytes * after.total_kv_heads / spec.total_kv_heads)


def test_prune_heads_transform_reports_exact_fraction(tiny_gqa):
    scores = random_scores(ModelSpec.from_model(tiny_gqa))
    report = PruneHeads(fraction=0.3, layout="global", granularity="kv_group").apply(tiny_gqa, scores=scores)
    # 12 heads in groups of 2: the closest to 3.6 heads is 4 (two groups).
    assert report.removed["fraction_achieved"] == pytest.approx(4 / 12)
    assert report.removed["kv_heads_removed"] == 2
    assert report.params_removed == (4 + 2) * 2 * HIDDEN * HEAD_DIM  # 4 query heads, 2 KV heads
    assert report.to_dict()["params_removed"] == report.params_removed
    with pytest.raises(LeanLMError, match="head scores"):
        PruneHeads().apply(tiny_llama(num_layers=1))


# ---------------------------------------------------------------- export and reload


def test_uniform_result_reloads_as_stock(tiny_gqa, random_ids, tmp_path):
    spec = ModelSpec.from_model(tiny_gqa)
    prune_heads(tiny_gqa, select_heads(random_scores(spec), 0.5, "uniform", "query", spec))
    assert not is_compact(tiny_gqa.config)
    assert (tiny_gqa.config.num_attention_heads, tiny_gqa.config.num_key_value_heads) == (2, 2)
    tiny_gqa.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, random_ids), logits(tiny_gqa, random_ids))
    assert maybe_load_compact(tmp_path) is None


@pytest.mark.parametrize("kind, layout", [("gqa", "global"), ("mha", "uniform")])
def test_compact_and_padded_round_trips(kind, layout, random_ids, tmp_path):
    # GQA global: layers differ. MHA uniform 3 of 4 heads: 64 % 3 != 0, so the stock config refuses it.
    model = make_model(kind)
    original_params = param_count(model)
    spec = ModelSpec.from_model(model)
    fraction = 0.3 if kind == "gqa" else 0.25  # GQA: two of the six groups, so layers differ
    prune_heads(model, select_heads(random_scores(spec, seed=3), fraction, layout, "kv_group", spec))
    assert is_compact(model.config)
    expected = logits(model, random_ids)

    save_compact(model, None, tmp_path / "compact")
    compact = maybe_load_compact(tmp_path / "compact")
    assert torch.equal(logits(compact, random_ids), expected)
    assert ModelSpec.from_model(compact) == ModelSpec.from_model(model)
    assert param_count(compact) < original_params

    padded = pad_heads(model)
    assert not is_compact(padded.config) and ModelSpec.from_model(padded).heads_per_layer == spec.heads_per_layer
    padded.save_pretrained(tmp_path / "padded")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "padded").eval()
    torch.testing.assert_close(logits(stock, random_ids), expected, atol=1e-5, rtol=0)


def test_compact_format_carries_heads_mlp_and_layers(random_ids, tmp_path):
    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    two_layers = param_count(tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True))
    prune_heads(model, {0: [0, 2], 2: [2, 3]})
    prune_mlp(model, {1: list(range(0, 128, 3))})
    prune_layers(model, [1])
    assert model.config.leanlm_heads_per_layer == [2, 2]
    assert model.config.leanlm_kv_heads_per_layer == [2, 1]
    assert model.config.leanlm_layers_kept == [0, 2]
    assert model.config.intermediate_size == 128  # the pruned MLP went with layer 1
    save_compact(model, None, tmp_path)
    reloaded = load_compact(tmp_path)
    assert torch.equal(logits(reloaded, random_ids), logits(model, random_ids))
    assert param_count(reloaded) == param_count(model) < two_layers


# ---------------------------------------------------------------- layer pruning


class SkipBlock(nn.Module):
    """A decoder block that passes the residual stream through unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_removing_no_layer_is_the_identity(tiny_gqa, random_ids):
    before = logits(tiny_gqa, random_ids)
    prune_layers(tiny_gqa, [])
    assert torch.equal(logits(tiny_gqa, random_ids), before)


def test_removing_a_layer_equals_skipping_it(random_ids, tmp_path):
    reference = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    reference.model.layers[1] = SkipBlock()
    model = prune_layers(tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2), [1])
    full = logits(model, random_ids)
    torch.testing.assert_close(full, logits(reference, random_ids), atol=1e-6, rtol=0)
    assert model.config.num_hidden_layers == 2

    # The KV cache is indexed by layer_idx: a cached second step must match the full forward.
    with torch.inference_mode():
        cache = model(random_ids[:, :-1], use_cache=True).past_key_values
        step = model(random_ids[:, -1:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)
    out = model.generate(random_ids[:1, :8], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 13)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, random_ids), full)


def test_block_influence_finds_a_do_nothing_block(random_ids):
    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    with torch.no_grad():  # block 2 adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    scores = block_influence(model, [random_ids])
    assert scores[2] == pytest.approx(0.0, abs=1e-6) and min(scores[:2]) > 1e-3
    report = PruneLayers(num_layers=1).apply(model, calibration=[random_ids])
    assert report.removed["layers"] == [2]
    with pytest.raises(LeanLMError, match="calibration"):
        PruneLayers(num_layers=1).apply(model)


# ---------------------------------------------------------------- MLP pruning


@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_removing_mlp_channels_equals_zeroing_them(layout, random_ids, tmp_path):
    model = make_model("gqa")
    original_params = param_count(model)
    remove = select_channels(channel_scores(model, [random_ids]), 0.3, layout)
    with mask_channels(model, remove):
        masked = logits(model, random_ids)
    prune_mlp(model, remove)
    result = logits(model, random_ids)
    torch.testing.assert_close(result, masked, atol=1e-5, rtol=0)
    removed = sum(map(len, remove.values()))
    assert original_params - param_count(model) == removed * 3 * HIDDEN  # gate row, up row, down column

    if layout == "uniform":
        assert model.config.intermediate_size == 128 - round(0.3 * 128) and not is_compact(model.config)
        model.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    else:
        assert is_compact(model.config)
        save_compact(model, None, tmp_path)
        reloaded = maybe_load_compact(tmp_path)
    assert torch.equal(logits(reloaded, random_ids), result)


def test_mlp_selection_rules():
    scores = [torch.tensor([0.1, 0.5, 0.2, 0.9]), torch.tensor([0.05, 0.6, 0.7, 0.8])]
    assert select_channels(scores, 0.5, "uniform") == {0: [0, 2], 1: [0, 1]}
    assert select_channels(scores, 0.25, "global") == {0: [0], 1: [0]}
    with pytest.raises(LeanLMError, match="every MLP channel of layer 0"):
        select_channels([torch.tensor([0.1, 0.2]), torch.tensor([0.9, 0.8])], 0.5, "global")


# ---------------------------------------------------------------- registry


def test_registry_and_options():
    assert set(TRANSFORMS) >= {"prune_heads", "prune_layers", "prune_mlp"}
    assert TRANSFORMS["prune_mlp"].from_dict({"fraction": 0.1}) == PruneMLP(fraction=0.1)
    with pytest.raises(LeanLMError, match="unknown key .prune_heads.fracton"):
        TRANSFORMS["prune_heads"].from_dict({"fracton": 0.1})
    with pytest.raises(LeanLMError, match="layout"):
        PruneHeads(layout="sideways")
    assert removed_fraction({0: [1, 3]}, ModelSpec.from_model(tiny_llama(num_layers=1))) == 0.5
