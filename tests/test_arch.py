"""models/arch.py on tiny Llama, Qwen2 and Gemma 3: the views match the modules, and every KV policy,
head/MLP/layer pruning and the compact format work through them on each family."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, MistralConfig, MistralForCausalLM

from leanlm.errors import LeanLMError
from leanlm.kvcache import CACHE_POLICIES, attach, make_policy
from leanlm.models import ModelSpec, arch_of, load_model, tiny_model
from leanlm.transforms import save_compact
from leanlm.transforms.prune_heads import mask_heads, prune_heads
from leanlm.transforms.prune_layers import prune_layers
from leanlm.transforms.prune_mlp import mask_channels, prune_mlp

from kv_helpers import run_chunks

FAMILIES = ["llama", "qwen2", "gemma3"]
CONTEXT, CHUNK = 48, 8  # > Gemma's tiny window of 8: its sliding layers really slide


def family_model(family: str):
    """GQA (4 query / 2 KV heads), head_dim 32 (a multiple of the quantization groups), 4 layers."""
    return tiny_model(family, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128)


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    return request.param, family_model(request.param)


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def kv_fam(request):
    """The KV tests' families (Llama's own run in test_kvcache.py)."""
    return request.param, family_model(request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, CONTEXT), generator=torch.Generator().manual_seed(5))


def test_views_report_the_modules(fam):
    family, model = fam
    arch = arch_of(model)
    spec = ModelSpec.from_model(model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 4, 2, 32)
    assert spec == ModelSpec.from_config(model.config)
    view = arch.attention(1)
    assert view.module is model.model.layers[1].self_attn and view.q_proj is view.module.q_proj
    assert arch.mlp(0).down_proj is model.model.layers[0].mlp.down_proj
    if family == "gemma3":
        assert arch.layer_types() == ["sliding_attention", "full_attention"] * 2
        assert spec.window_per_layer == (8, None, 8, None)
        assert view.q_norm is view.module.q_norm and view.scaling == 64**-0.5  # query_pre_attn_scalar = 64
        assert not torch.equal(arch.inv_freq(0), arch.inv_freq(1))  # local and global RoPE bases
    else:
        assert arch.layer_types() == ["full_attention"] * 4 and spec.window_per_layer == ()
        assert view.q_norm is None and view.scaling == 32**-0.5
    assert (view.q_proj.bias is not None) == (family == "qwen2")


def test_rotated_keys_are_what_the_model_caches(fam, ids):
    """The view's post-norm, post-RoPE keys/values equal what the attention module puts in its cache."""
    _, model = fam
    arch = arch_of(model)
    grabbed = {}

    def grab(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        view = arch.attention(module.layer_idx)
        grabbed[module.layer_idx] = view.rotated_keys_values(hidden, kwargs["position_embeddings"])

    handles = [view.module.register_forward_pre_hook(grab, with_kwargs=True) for view in arch.attentions()]
    try:
        with torch.no_grad():
            cache = model(ids[:, :6], use_cache=True).past_key_values
    finally:
        for handle in handles:
            handle.remove()
    for index, layer in enumerate(cache.layers):
        keys, values = grabbed[index]
        torch.testing.assert_close(keys, layer.keys, rtol=0, atol=1e-6)
        torch.testing.assert_close(values, layer.values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CACHE_POLICIES))
def test_every_policy_at_full_budget_is_the_full_cache(kv_fam, ids, name):
    family, model = kv_fam
    reference = run_chunks(model, ids, DynamicCache(config=model.config), CHUNK)
    with attach(model, make_policy(name, 1.0, CONTEXT, model=model, group=16)) as cache:
        logits = run_chunks(model, ids, cache, CHUNK)
        if family == "gemma3":  # the model's own windows: sliding layers never hold more than window - 1
            assert all(layer.held_tokens() == 7 for layer, w in zip(cache.layers, (8, None) * 2) if w)
    assert torch.equal(logits, reference)


@pytest.mark.parametrize("name", ["sink_window", "heavy_hitter", "observation_window", "quantized"])
def test_policies_hold_less_at_a_quarter_budget(kv_fam, ids, name):
    family, model = kv_fam
    full = DynamicCache(config=model.config)
    reference = run_chunks(model, ids, full, CHUNK)
    with attach(model, make_policy(name, 0.25, CONTEXT, model=model, group=16, **({"residual": 16} if name == "quantized" else {}))) as cache:
        logits = run_chunks(model, ids, cache, CHUNK)
        full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
        assert cache.nbytes() < 0.6 * full_bytes
    assert torch.isfinite(logits).all() and not torch.equal(logits, reference)


def test_sink_window_cache_positions_use_the_models_rope_and_refuse_sliding_layers():
    model = family_model("qwen2")
    with attach(model, make_policy("sink_window", 1.0, CONTEXT, position_mode="cache")) as cache:
        assert torch.equal(cache.layers[1].inv_freq, arch_of(model).inv_freq(1))
    with pytest.raises(LeanLMError, match="not supported on gemma3"):
        with attach(family_model("gemma3"), make_policy("sink_window", 1.0, CONTEXT, position_mode="cache")):
            pass


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_head_pruning_equals_masking_and_reloads(family, ids, tmp_path):
    model = family_model(family)
    remove = {0: [1, 3], 2: [0, 1]}  # layer 0: one head per group; layer 2: a whole KV group
    with mask_heads(model, remove):
        masked = logits(model, ids)
    prune_heads(model, remove)
    spec = ModelSpec.from_model(model)
    assert spec.heads_per_layer == (2, 4, 2, 4) and spec.kv_heads_per_layer == (2, 2, 1, 2)
    if family == "qwen2":  # biases went with their rows
        attn = arch_of(model).attention(2)
        assert attn.q_proj.bias.shape == (64,) and attn.k_proj.bias.shape == (32,)
    torch.testing.assert_close(logits(model, ids), masked, rtol=1e-4, atol=1e-4)
    save_compact(model, None, tmp_path)
    torch.testing.assert_close(logits(load_model(str(tmp_path)), ids), logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_and_layer_pruning_on_each_family(family, ids, tmp_path):
    model = family_model(family)
    remove = {1: list(range(0, 128, 3)), 3: [5, 6]}
    with mask_channels(model, remove):
        masked = logits(model, ids)
    prune_mlp(model, remove)
    torch.testing.assert_close(logits(model, ids), masked, rtol=1e-4, atol=1e-4)
    prune_layers(model, [1])
    arch = arch_of(model)
    assert [view.module.layer_idx for view in arch.attentions()] == [0, 1, 2]
    if family == "gemma3":  # layer 1 (global) went: types follow, modules keep their own type
        assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
        assert [view.module.sliding_window for view in arch.attentions()] == [8, 8, None]
    before = logits(model, ids)
    with attach(model, make_policy("sink_window", 1.0, CONTEXT)) as cache:
        torch.testing.assert_close(run_chunks(model, ids, cache, CHUNK), before, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(load_model(str(tmp_path)), ids), before, rtol=0, atol=0)


def test_an_unknown_family_is_a_clear_error():
    model = MistralForCausalLM(MistralConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=64, vocab_size=64))
    with pytest.raises(LeanLMError, match="model type 'mistral'.*llama, qwen2, gemma3_text"):
        ModelSpec.from_model(model)
    assert LlamaConfig().model_type == "llama"
