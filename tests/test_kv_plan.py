"""The KV budget planner: per-layer KL probes, the choice under a byte budget, the recipe it writes."""

import copy

import pytest
import torch

from leanlm.analyze.kv_plan import PolicyProbe, _kl, _logits, choose_plan, layer_probes, plan_recipe
from leanlm.errors import LeanLMError
from leanlm.models import tiny_model
from leanlm.transforms import merge_kv_heads
from leanlm.transforms.share_kv import ShareKV

PROBES = [{3: 0.0, 1: 0.5}, {3: 0.0, 1: 0.1}, {3: 0.0, 1: 0.3}]
POLICIES = [PolicyProbe("quantized", 0.25, 0.25, 0.02), PolicyProbe("quantized", 0.125, 0.16, 0.3),
            PolicyProbe("heavy_hitter+int4", 0.125, 0.125, 0.1)]


def test_choice_by_hand():
    plan = choose_plan(PROBES, POLICIES, budget=0.125)
    # none: needs <= 1.125 of 9 KV heads, impossible. quantized@0.25: <= 4.5 heads -> all layers merged, KL 0.92.
    # quantized@0.125 (0.16 measured): <= 7.03 heads -> the cheapest layer (1) merged, KL 0.1 + 0.3 = 0.4.
    # heavy_hitter+int4@0.125: nothing merged, KL 0.1 -> the best.
    assert (plan.policy, plan.policy_budget, plan.kv_heads_per_layer) == ("heavy_hitter+int4", 0.125, [3, 3, 3])
    assert plan.estimated_kl == pytest.approx(0.1) and plan.bytes_fraction == pytest.approx(0.125)
    by_policy = {(o["policy"], o["policy_budget"]): o for o in plan.options}
    assert by_policy[("quantized", 0.125)]["kv_heads_per_layer"] == [3, 1, 3]
    assert by_policy[("quantized", 0.125)]["estimated_kl"] == pytest.approx(0.4)
    assert by_policy[("quantized", 0.25)]["kv_heads_per_layer"] == [1, 1, 1]
    assert by_policy[("quantized", 0.25)]["bytes_fraction"] == pytest.approx(0.25 / 3)
    assert ("none", 1.0) not in by_policy
    assert all(o["bytes_fraction"] <= 0.125 + 1e-12 for o in plan.options)


def test_structure_alone_when_the_budget_allows_it():
    plan = choose_plan(PROBES, [], budget=0.8)  # <= 7.2 heads: merge layer 1 only
    assert (plan.policy, plan.kv_heads_per_layer) == ("none", [3, 1, 3])
    assert plan.estimated_kl == pytest.approx(0.1)


def test_impossible_budget_is_one_clear_error():
    with pytest.raises(LeanLMError, match="no plan meets a KV budget of 0.01"):
        choose_plan(PROBES, POLICIES, budget=0.01)
    with pytest.raises(LeanLMError, match="in \\(0, 1\\]"):
        choose_plan(PROBES, POLICIES, budget=0.0)


def test_layer_probes_measure_each_layer_alone_and_leave_the_model_as_it_was(random_ids):
    model = tiny_model("llama", num_layers=2, num_heads=4, num_kv_heads=2).double()
    batches = [random_ids[:1], random_ids[1:]]
    before = _logits(model, batches)
    probes = layer_probes(model, batches, "mean")
    assert torch.equal(_logits(model, batches), before)
    assert [sorted(row) for row in probes] == [[1, 2], [1, 2]] and all(row[2] == 0.0 for row in probes)
    alone = copy.deepcopy(model)
    merge_kv_heads(alone, {1: 1}, "mean")
    assert probes[1][1] == pytest.approx(_kl(before, _logits(alone, batches)), rel=1e-9) and probes[1][1] > 0


def test_the_plan_is_a_recipe_that_loads(tmp_path):
    from leanlm.recipe import load_recipe

    plan = choose_plan(PROBES, POLICIES[:2], budget=0.125)
    path = tmp_path / "recipe.yaml"
    path.write_text(plan_recipe(plan, "smollm2-135m"))
    recipe = load_recipe(path)
    assert recipe.transforms == [ShareKV(method="calibrated", per_layer=plan.kv_heads_per_layer)]
    assert "--kv-cache quantized --kv-budget 0.125" in path.read_text()
