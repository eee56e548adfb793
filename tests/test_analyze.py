"""Head gates, head scorers (KL utility, magnitude, Taylor), KV budget, score files and heatmaps."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leanlm.analyze import (
    SCORERS,
    HeadScores,
    KLUtilityScorer,
    MagnitudeScorer,
    TaylorScorer,
    ablation_gates,
    analytic_kv_bytes_per_token,
    format_kv_table,
    head_gates,
    kv_budget,
    score_heads,
)
from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, decoder_layers, tiny_llama
from leanlm.report.head_plots import plot_group_heatmap, plot_head_heatmap

HEAD_DIM = 16


def batches(count: int = 2, seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 12), generator=generator) for _ in range(count)]


def zero_heads(model: nn.Module, layer: int, heads: list[int]) -> nn.Module:
    """A copy of ``model`` with the o_proj columns of ``heads`` in ``layer`` zeroed (the head removed)."""
    model = copy.deepcopy(model)
    weight = decoder_layers(model)[layer].self_attn.o_proj.weight  # (hidden, heads * head_dim)
    with torch.no_grad():
        for h in heads:
            weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0.0
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def shrink_first_layer(model: nn.Module) -> nn.Module:
    """Keep query heads 0 and 2 of layer 0 (one per KV group): per-layer head counts (2, 4, ...)."""
    attn = decoder_layers(model)[0].self_attn
    keep = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in (0, 2)])
    q, o = nn.Linear(attn.q_proj.in_features, len(keep), bias=False), nn.Linear(len(keep), attn.o_proj.out_features, bias=False)
    with torch.no_grad():
        q.weight.copy_(attn.q_proj.weight[keep])
        o.weight.copy_(attn.o_proj.weight[:, keep])
    attn.q_proj, attn.o_proj, attn.num_key_value_groups = q, o, 1
    return model


# --- head gates -------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_all_ones_gates_leave_logits_unchanged(kv_heads, random_ids):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=kv_heads)
    with head_gates(model, torch.ones(2, 4)):
        gated = logits(model, random_ids)
    assert torch.equal(gated, logits(model, random_ids))


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_gate_zero_equals_zeroed_o_proj_columns(kv_heads, random_ids):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=kv_heads)
    with head_gates(model, ablation_gates(ModelSpec.from_model(model), layer=1, heads=[2])):
        gated = logits(model, random_ids)
    assert torch.allclose(gated, logits(zero_heads(model, 1, [2]), random_ids), atol=1e-5)
    assert not torch.allclose(gated, logits(model, random_ids), atol=1e-3)  # the head mattered


def test_per_sequence_gates(tiny_gqa, random_ids):
    gates = [torch.ones(4), torch.tensor([[1.0, 1, 1, 1], [1, 0, 1, 1]]), torch.ones(4)]  # layer 1: (batch, heads)
    with head_gates(tiny_gqa, gates):
        gated = logits(tiny_gqa, random_ids)
    assert torch.equal(gated[0], logits(tiny_gqa, random_ids[:1])[0])
    assert torch.allclose(gated[1], logits(zero_heads(tiny_gqa, 1, [1]), random_ids[1:])[0], atol=1e-5)


def test_hooks_are_removed_even_after_an_error(tiny_gqa, random_ids):
    with pytest.raises(RuntimeError), head_gates(tiny_gqa, torch.zeros(3, 4)):
        raise RuntimeError("boom")
    assert all(not layer.self_attn.o_proj._forward_pre_hooks for layer in decoder_layers(tiny_gqa))


def test_wrong_gate_shape_is_a_user_error(tiny_gqa):
    with pytest.raises(LeanLMError, match="one value per query head"), head_gates(tiny_gqa, torch.ones(3, 5)):
        pass


def test_per_layer_head_counts(random_ids):
    model = shrink_first_layer(tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2))
    assert ModelSpec.from_model(model).heads_per_layer == (2, 4)
    with head_gates(model, [torch.ones(2), torch.ones(4)]):
        assert torch.equal(logits(model, random_ids), logits(model, random_ids))
    scores = KLUtilityScorer().score(model, batches(1))
    assert [len(row) for row in scores.per_head] == [2, 4] and [len(row) for row in scores.per_kv_group] == [2, 2]


# --- scorers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_a_zeroed_head_scores_exactly_zero(name):
    model = zero_heads(tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2), layer=1, heads=[3])
    scores = SCORERS[name]().score(model, batches())
    assert scores.scorer == name
    assert scores.per_head[1][3] == 0.0
    others = [x for layer, row in enumerate(scores.per_head) for h, x in enumerate(row) if (layer, h) != (1, 3)]
    assert min(others) > 0.0 and min(x for row in scores.per_kv_group for x in row) > 0.0
    assert scores.ranking()[0] == (1, 3)


def test_magnitude_is_the_norm_of_the_o_proj_slice(tiny_gqa):
    scores = MagnitudeScorer().score(tiny_gqa, [])
    weight = decoder_layers(tiny_gqa)[2].self_attn.o_proj.weight
    assert scores.per_head[2][1] == pytest.approx(weight[:, 16:32].norm().item(), rel=1e-6)
    assert scores.per_kv_group[2][1] == pytest.approx(weight[:, 32:64].norm().item(), rel=1e-6)  # heads 2, 3


def naive_kl(model: nn.Module, ablated: nn.Module, data: list[torch.Tensor]) -> float:
    """Mean over positions of KL(full || ablated), with two full forwards per batch."""
    total, positions = 0.0, 0
    for ids in data:
        log_p = F.log_softmax(logits(model, ids).float(), -1)
        log_q = F.log_softmax(logits(ablated, ids).float(), -1)
        total += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
        positions += ids.numel()
    return total / positions


@pytest.mark.parametrize("kv_heads,max_rows", [(None, 8192), (2, 8192), (2, 60)])
def test_cached_kl_matches_full_forwards(kv_heads, max_rows):
    model, data = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=kv_heads), batches()
    # chunk_rows=20: vocabulary chunks that do not divide the positions; max_rows=60: one ablation per stack.
    scores = KLUtilityScorer(max_rows=max_rows, chunk_rows=20).score(model, data)
    for layer in range(2):
        for head in range(4):
            expected = naive_kl(model, zero_heads(model, layer, [head]), data)
            assert scores.per_head[layer][head] == pytest.approx(expected, abs=1e-5)
        group = 4 // (kv_heads or 4)
        for g in range(kv_heads or 4):
            expected = naive_kl(model, zero_heads(model, layer, list(range(g * group, (g + 1) * group))), data)
            assert scores.per_kv_group[layer][g] == pytest.approx(expected, abs=1e-5)


def test_kv_group_kl_is_its_own_measurement_not_a_sum():
    scores = KLUtilityScorer().score(tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2), batches())
    assert scores.per_kv_group[0][0] != pytest.approx(scores.per_head[0][0] + scores.per_head[0][1])


def loss_with_scaled_heads(model: nn.Module, layer: int, heads: list[int], scale: float, ids: torch.Tensor) -> float:
    """The LM loss with the o_proj columns of ``heads`` scaled: the same as setting their gates to ``scale``."""
    scaled = copy.deepcopy(model)
    weight = decoder_layers(scaled)[layer].self_attn.o_proj.weight
    with torch.no_grad():
        for h in heads:
            weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] *= scale
        out = logits(scaled, ids)  # (batch, seq, vocab); transformers' own loss would round to float32
    return F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).item()


def weight_gradient_reference(model: nn.Module, layer: int, heads: list[int], ids: torch.Tensor) -> float:
    """|dL/dgate| by the chain rule through the weights: gate g scales W_h, so dL/dg = sum(W_h * dL/dW_h)."""
    model = copy.deepcopy(model)
    model(ids, labels=ids, use_cache=False).loss.backward()
    o_proj = decoder_layers(model)[layer].self_attn.o_proj
    cols = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])
    return abs((o_proj.weight[:, cols] * o_proj.weight.grad[:, cols]).sum().item())


def test_taylor_matches_weight_gradients_and_finite_differences():
    model, data = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2).double(), batches(1)
    scores = TaylorScorer().score(model, data)
    assert scores.per_head[1][2] == pytest.approx(weight_gradient_reference(model, 1, [2], data[0]), rel=1e-6)
    assert scores.per_kv_group[0][1] == pytest.approx(weight_gradient_reference(model, 0, [2, 3], data[0]), rel=1e-6)
    # Central differences; loose, since RMSNorm runs in float32 even in a float64 model.
    eps = 3e-3
    up, down = (loss_with_scaled_heads(model, 0, [2, 3], 1 + s, data[0]) for s in (eps, -eps))
    assert scores.per_kv_group[0][1] == pytest.approx(abs(up - down) / (2 * eps), rel=1e-3)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # flags restored, no grads left


# --- KV budget --------------------------------------------------------------------------------


def test_kv_budget_rows_match_hand_formulas():
    spec = ModelSpec.from_model(tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16))
    rows = {row.name: row for row in kv_budget(spec, seq_len=100, batch=2, dtype_bytes=2)}
    own = 2 * 3 * 2 * 16 * 2  # 2 (K, V) × layers × kv_heads × head_dim × bytes
    assert analytic_kv_bytes_per_token(spec, 2) == own
    assert rows["GQA (model)"].bytes_per_token == own and rows["GQA (model)"].ratio == 1.0
    assert rows["GQA (model)"].bytes_per_sequence == own * 100 * 2
    assert rows["MHA"].bytes_per_token == 2 * 3 * 4 * 16 * 2 and rows["MQA"].bytes_per_token == 2 * 3 * 1 * 16 * 2
    assert rows["MLA latent (d=32)"].bytes_per_token == 3 * 32 * 2  # default latent: kv_heads × head_dim
    # 4-bit: 32 values per layer for K (and V) -> 16 bytes packed + one group (fp16 scale + zero = 4 bytes).
    assert rows["int4 K/V"].bytes_per_token == 2 * 3 * (32 * 4 / 8 + 1 * 4)
    assert rows["int8 K/V"].bytes_per_token == 2 * 3 * (32 + 4)
    assert rows["MQA"].ratio == pytest.approx(0.5)
    table = format_kv_table(list(rows.values()))
    assert "| GQA (model) |" in table and "KiB" in table


def test_kv_budget_names_an_mha_model_and_rejects_bad_values(tiny_mha):
    spec = ModelSpec.from_model(tiny_mha)
    assert "MHA (model)" in [row.name for row in kv_budget(spec)]
    with pytest.raises(LeanLMError):
        kv_budget(spec, seq_len=0)


# --- score files, plots, entry point ----------------------------------------------------------


def test_head_scores_json_round_trip_and_ranking(tmp_path):
    scores = HeadScores("kl", [[0.3, 0.1], [0.2, 0.0]], [[0.4], [0.25]], {"tokens": 96, "split": "validation"}, 1.5)
    scores.save_json(tmp_path / "s.json")
    assert HeadScores.load_json(tmp_path / "s.json") == scores
    assert scores.ranking() == [(1, 1), (0, 1), (1, 0), (0, 0)]
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temp file left
    with pytest.raises(LeanLMError, match="no head scores"):
        HeadScores.load_json(tmp_path / "missing.json")


def test_heatmaps_write_pngs_even_with_ragged_layers(tmp_path):
    scores = HeadScores("magnitude", [[1.0, 2.0, 3.0, 4.0], [1.0, math.nan]], [[3.0, 7.0], [1.0]], {}, 0.0)
    plot_head_heatmap(scores, tmp_path / "heads.png")
    plot_group_heatmap(scores, tmp_path / "groups.png")
    for name in ("heads.png", "groups.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_scorer_is_a_user_error(tiny_gqa):
    with pytest.raises(LeanLMError, match="unknown scorer 'vibes'.*kl"):
        score_heads(tiny_gqa, None, ["kl", "vibes"])


@pytest.mark.real_model
def test_score_heads_on_the_real_model(real_model_bf16, real_tokenizer):
    results = score_heads(real_model_bf16, real_tokenizer, ["magnitude", "kl"], num_samples=2, seq_len=32, batch_size=2)
    for scores in results.values():
        assert [len(row) for row in scores.per_head] == [9] * 30
        assert [len(row) for row in scores.per_kv_group] == [3] * 30
        values = [x for row in scores.per_head + scores.per_kv_group for x in row]
        assert all(math.isfinite(x) and x >= 0.0 for x in values)
    data = results["kl"].calibration.pop("data")  # what was read (leanlm.data.sources), recorded with the scores
    assert results["kl"].calibration == {"num_samples": 2, "seq_len": 32, "tokens": 64, "split": "validation",
                                         "dtype": "bfloat16"}
    assert data["spec"] == "wikitext" and data["sources"][0]["windows"] == 2 and data["sources"][0]["tokens"] > 200_000
