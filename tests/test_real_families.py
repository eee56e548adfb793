"""One short check per real model family (marked real_model): SmolLM2 (Llama), Qwen2.5 (Qwen2),
Gemma 3. Each needs its packages (`make models` for Qwen2.5 and Gemma 3); a missing one is a skip
that names the install step."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import DynamicCache

from leanlm.errors import LeanLMError
from leanlm.kvcache import CACHE_POLICIES, attach, make_policy
from leanlm.models import BUNDLED, ModelSpec, arch_of, load_model, load_tokenizer
from leanlm.transforms.prune_heads import prune_heads

from kv_helpers import run_chunks

# name -> (family, layers, query heads, KV heads, head_dim)
REAL = {
    "smollm2-135m": ("llama", 30, 9, 3, 64),
    "qwen2.5-0.5b": ("qwen2", 24, 14, 2, 64),
    "gemma3-270m": ("gemma3", 18, 4, 1, 256),
}
TEXT = ("The history of the city begins in the Roman era, when a small fort was built on the river. "
        "Over the following centuries the settlement grew into a market town, and by the twelfth century "
        "it had a cathedral, a castle and a charter of its own.")


def installed(name: str) -> bool:
    return all(importlib.util.find_spec(package) is not None for package, _ in BUNDLED[name].parts)


@pytest.fixture(scope="module", params=sorted(REAL))
def real(request):
    name = request.param
    if not installed(name):
        pytest.skip(f"{name} is not installed (make models)")
    return name, load_model(name, dtype="float32"), load_tokenizer(name)


@pytest.mark.real_model
def test_real_family_layout_policies_and_pruned_reload(real, tmp_path):
    name, model, tokenizer = real
    family, layers, heads, kv_heads, head_dim = REAL[name]
    assert arch_of(model).family.name == family
    spec = ModelSpec.from_model(model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (layers, heads, kv_heads, head_dim)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :48]  # (1, 48)
    reference = run_chunks(model, ids, DynamicCache(config=model.config), 16)
    for policy in sorted(CACHE_POLICIES):  # every policy at budget 1.0 is the full cache
        with attach(model, make_policy(policy, 1.0, ids.shape[1], tokenizer, group=32)) as cache:
            assert torch.equal(run_chunks(model, ids, cache, 16), reference), policy
    # Prune one query head per KV group in layer 0 and a whole KV group in layer 1 (when it has two).
    group = heads // kv_heads
    remove = {0: [g * group for g in range(kv_heads)]} if group > 1 else {}
    if kv_heads > 1:
        remove[1] = list(range(group))
    if not remove:
        pytest.skip(f"{name} has one head per group and one group: nothing to prune but the layer")
    prune_heads(model, remove)
    with torch.no_grad():
        pruned = model(ids).logits
    from transformers import AutoModelForCausalLM

    from leanlm.export import export_model

    result = export_model(model, tokenizer, tmp_path / "export", card="# test")
    with torch.no_grad():
        # leanlm's loader reads the compact form exactly; stock transformers reads the padded copy
        # (zero heads re-inserted: equal up to float32 rounding of the longer o_proj sums).
        assert torch.equal(load_model(result.path)(ids).logits, pruned)
        stock = AutoModelForCausalLM.from_pretrained(result.padded_path or result.path, dtype=torch.float32)
        torch.testing.assert_close(stock(ids).logits, pruned, rtol=0, atol=2e-3)


@pytest.mark.real_model
def test_unknown_bundled_name_lists_the_families():
    with pytest.raises(LeanLMError, match="qwen2.5-0.5b"):
        load_model("qwen-nope")
