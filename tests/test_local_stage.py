"""The layer-local stage: every pruned layer's attention output error drops on held-out activations."""

from __future__ import annotations

import copy

import pytest
import torch

from leanlm.errors import LeanLMError
from leanlm.models import tiny_llama
from leanlm.recover.layer_local import LocalFitConfig
from leanlm.recover.local_stage import LocalStageConfig, changed_attention_layers, local_stage
from leanlm.transforms.prune_heads import prune_heads
from recipe_helpers import tiny_recipe


def _redundant(model, noise: float = 0.3):
    """Real heads overlap (that is why some can go): make every head a noisy copy of head 0 / KV group 0.
    In a random model heads are independent and nothing the kept heads compute predicts the removed ones."""
    generator = torch.Generator().manual_seed(1)
    head_dim = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                w = proj.weight.view(-1, head_dim, proj.weight.shape[1])  # (heads, head_dim, hidden)
                w[1:] = w[:1] + noise * torch.randn(w[1:].shape, generator=generator) * w[:1].std()
    return model


def _pair():
    teacher = _redundant(tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2, seed=3))
    student = prune_heads(copy.deepcopy(teacher), {0: [1, 3], 2: [2, 3]})  # query heads in layer 0, a KV group in 2
    windows = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))
    return teacher, student, windows


@pytest.mark.parametrize("method", ["lstsq", "adam"])
def test_layer_local_stage_reduces_each_pruned_layers_heldout_error(method):
    teacher, student, windows = _pair()
    assert changed_attention_layers(student, teacher) == [0, 2]
    config = LocalStageConfig(method=method, windows=16, batch_size=2, adam=LocalFitConfig(steps=60, lr=3e-3))
    untouched = copy.deepcopy(student.model.layers[1].state_dict())
    report = local_stage(student, teacher, windows, config)
    assert sorted(report["layers"]) == [0, 2]
    for layer, record in report["layers"].items():
        assert record["heldout_before"] > 0.01, layer  # pruning really changed the layer
        assert record["heldout_after"] < 0.9 * record["heldout_before"], (layer, record)
        assert record["after"] < record["before"], (layer, record)
    for name, tensor in student.model.layers[1].state_dict().items():  # an unchanged layer is left alone
        assert torch.equal(tensor, untouched[name]), name
    assert report["cpu_seconds"] > 0


def test_layer_local_stage_lowers_the_models_kl_to_the_teacher():
    teacher, student, windows = _pair()
    test_ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))

    def kl() -> float:
        with torch.no_grad():
            t = torch.log_softmax(teacher(test_ids).logits, -1)
            s = torch.log_softmax(student(test_ids).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    before = kl()
    local_stage(student, teacher, windows, LocalStageConfig(windows=16))
    assert kl() < before


def test_layer_local_stage_refuses_bad_settings():
    teacher, student, windows = _pair()
    with pytest.raises(LeanLMError):
        local_stage(student, teacher, windows, LocalStageConfig(method="sgd"))
    with pytest.raises(LeanLMError):
        local_stage(student, teacher, windows[:4], LocalStageConfig(windows=16))
    with pytest.raises(LeanLMError):
        changed_attention_layers(tiny_llama(num_layers=2), teacher)


LOCAL_BODY = """
transforms:
  - {name: prune_heads, fraction: 0.25, granularity: query, scorer: magnitude}
recover:
  local: {method: lstsq, windows: 4, batch_size: 1}
  distill: {steps: 1, max_minutes: null, max_cpu_minutes: 5, batch_size: 2, seq_len: 32, checkpoint_every: 0}
  variants: [lora_kd]
export: {enabled: false}
"""


def test_recipe_runs_the_layer_local_stage_before_kd(tmp_path, tiny_model_dir):
    import json

    from leanlm import cli

    path = tmp_path / "local.yaml"
    path.write_text(tiny_recipe("tiny-local", tiny_model_dir, LOCAL_BODY))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "stages" / "lora_kd-training.json").read_text())
    stage = record["local_stage"]
    assert stage["config"]["method"] == "lstsq" and stage["layers"]  # the pruned layers were fitted
    for layer in stage["layers"].values():
        assert layer["after"] < layer["before"]
    assert record["steps_done"] == 1
