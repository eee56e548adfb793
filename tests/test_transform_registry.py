"""Every registered transform: identity at its no-change setting, a real change survives save -> load."""

import pytest
import torch

from leanlm.analyze import SCORERS
from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, tiny_llama
from leanlm.transforms import TRANSFORMS, Transform, load_compact, save_compact

# A setting that really changes the model, for each registered transform. A new transform without an
# entry here fails test_every_transform_has_a_change_setting: it must be covered by the tests below.
CHANGE = {
    "latent_kv": {"kv_fraction": 0.25, "rope_pairs": 2},
    "prune_heads": {"fraction": 0.5, "layout": "global", "granularity": "query", "scorer": "taylor"},
    "prune_layers": {"num_layers": 1},
    "prune_mlp": {"fraction": 0.25, "layout": "global"},
    "swap_attention": {"replacement": "linear", "layers": [1], "window": 4, "sink": 1},
    "share_kv": {"kv_heads": 1, "method": "calibrated"},
}


def tiny_context(transform: Transform, model, batches: list[torch.Tensor]) -> dict:
    """What the pipeline's transform_context builds, from random token batches (no tokenizer, no data)."""
    context = {}
    if "calibration" in transform.needs:
        context["calibration"] = batches
    if "scores" in transform.needs:
        context["scores"] = SCORERS[transform.scorer]().score(model, batches)
    return context


@pytest.fixture
def batches():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (2, 16), generator=generator) for _ in range(2)]  # (batch, seq) each


def test_every_transform_has_a_change_setting():
    assert set(CHANGE) == set(TRANSFORMS)
    for name, cls in TRANSFORMS.items():
        assert cls.name == name and cls.identity_settings, name


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_no_change_setting_is_the_identity(name, batches, random_ids):
    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    with torch.no_grad():
        before = model(random_ids).logits
    transform = Transform.from_dict({"name": name, **TRANSFORMS[name].identity_settings})
    report = transform.apply(model, **tiny_context(transform, model, batches))
    assert report.params_removed == 0
    with torch.no_grad():
        assert torch.equal(model(random_ids).logits, before)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_change_survives_compact_save_and_load(name, batches, random_ids, tmp_path):
    model = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)
    with torch.no_grad():
        before = model(random_ids).logits
    transform = Transform.from_dict({"name": name, **CHANGE[name]})
    report = transform.apply(model, **tiny_context(transform, model, batches))
    assert report.params_after != report.params_before  # a real change (pruning removes, a linear swap adds)
    with torch.no_grad():
        after = model(random_ids).logits
    assert not torch.allclose(after, before)
    reloaded = load_compact(save_compact(model, None, tmp_path / "model"))
    assert ModelSpec.from_model(reloaded) == ModelSpec.from_model(model)
    with torch.no_grad():
        assert torch.equal(reloaded(random_ids).logits, after)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_to_dict_builds_the_same_transform(name):
    transform = Transform.from_dict({"name": name, **CHANGE[name]})
    assert Transform.from_dict(transform.to_dict()) == transform
    assert TRANSFORMS[name].from_dict({k: v for k, v in transform.to_dict().items() if k != "name"}) == transform


def test_from_dict_reports_every_problem_at_once():
    with pytest.raises(LeanLMError) as err:
        Transform.from_dict({"name": "prune_heads", "fracton": 0.1, "layout": "sideways", "fraction": 2.0})
    message = str(err.value)
    for fragment in ("unknown key 'prune_heads.fracton'", "'prune_heads.layout' must be one of global, uniform",
                     "must be in [0, 1), got 2.0"):
        assert fragment in message
    with pytest.raises(LeanLMError, match="unknown transform 'prune_everything'.*prune_heads"):
        Transform.from_dict({"name": "prune_everything"})
    with pytest.raises(LeanLMError, match="should be int"):
        Transform.from_dict({"name": "prune_layers", "num_layers": "two"})


def test_transform_that_needs_scores_refuses_to_run_without_them(tiny_gqa):
    with pytest.raises(LeanLMError, match="needs head scores"):
        Transform.from_dict({"name": "prune_heads"}).apply(tiny_gqa)
