"""latent_kv (MLA-style joint K/V latent, partial RoPE): exactness at full rank, absorbed == expanded decode,
cache bytes == tensors held, save -> reload, engine decode, one clear error for bad settings."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from leanlm.engine import generate, static_cache
from leanlm.errors import LeanLMError
from leanlm.kvcache.latent import LatentCache, LatentLayer, latent_cache
from leanlm.models import load_model, tiny_gemma3, tiny_llama, tiny_qwen2
from leanlm.models.compat import with_cache
from leanlm.models.latent_attention import LatentAttention, latent_layers
from leanlm.transforms import Transform, save_compact
from leanlm.transforms.latent_kv import convert
from recipe_helpers import tiny_recipe


@pytest.fixture
def calibration():
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 256, (4, 32), generator=generator) for _ in range(2)]  # (batch, seq) each


def ids(seed: int = 1, length: int = 20, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def set_absorb(model, mode: str) -> None:
    for _, module in latent_layers(model):
        module.absorb = mode


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_full_rank_with_every_pair_kept_as_rope_equals_the_original(make, calibration):
    model = make(num_layers=2, num_heads=4, num_kv_heads=2).double()  # float64: the SVD round trip is exact
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    report = convert(model, calibration, rope_pairs=8, ranks=2 * 16)  # head_dim 16: 8 pairs; V rows: 2 x 16
    assert len(latent_layers(model)) == 2 and report["kv_fraction_achieved"] == 1.0
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-9)


def test_fewer_pairs_or_rank_change_the_model_and_keep_the_chosen_channels(calibration):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    report = convert(model, calibration, rope_pairs=2, kv_fraction=0.25)
    assert report["rank_per_layer"] == [8, 8]  # 0.25 x 2 x 2 x 16 = 16 elements, 2 x 2 x 2 of them RoPE
    module = latent_layers(model)[0][1]
    pairs = torch.tensor(report["rope_pairs_per_layer"][0])  # (kv_heads, 2)
    assert torch.equal(module.rope_index, torch.cat([pairs, pairs + 8], dim=-1))
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, before, atol=1e-3)


def test_absorbed_decode_equals_re_expanded_decode(calibration):
    model = tiny_qwen2(num_layers=2, num_heads=4, num_kv_heads=2)  # biases: absorbed decode must carry them
    convert(model, calibration, rope_pairs=2, kv_fraction=0.5)
    prompt = ids(length=12)
    logits = {}
    for mode in ("never", "always"):
        set_absorb(model, mode)
        cache = latent_cache(model)
        with torch.no_grad():
            first = model(prompt, **with_cache(cache), use_cache=True).logits
            step = model(first[:, -1:].argmax(-1), **with_cache(cache), use_cache=True).logits
        logits[mode] = torch.cat([first, step], dim=1)
    torch.testing.assert_close(logits["always"], logits["never"], rtol=1e-4, atol=1e-5)
    set_absorb(model, "auto")
    tokens = {mode: generate(model, prompt, 8) for mode in ("auto", "never")}
    set_absorb(model, "never")
    assert torch.equal(generate(model, prompt, 8), tokens["auto"])


def test_engine_decode_matches_a_full_forward_of_the_generated_text(calibration):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    convert(model, calibration, rope_pairs=2, kv_fraction=0.25)
    prompt = ids(length=10, batch=1)
    new = generate(model, prompt, 6, cache=latent_cache(model), prefill_chunk=4)  # chunked prefill too
    assert torch.equal(generate(model, prompt, 6), new)  # default DynamicCache holds the same two tensors
    with torch.no_grad():
        full = model(torch.cat([prompt, new], dim=1)).logits  # (1, 16, vocab), no cache
    assert torch.equal(full[0, 9:15].argmax(-1), new[0])


def walk_tensors(obj) -> list[torch.Tensor]:
    return [v for v in vars(obj).values() if isinstance(v, torch.Tensor)]


def test_cache_bytes_equal_the_tensors_held(calibration):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2).to(torch.bfloat16)
    report = convert(model, calibration, rope_pairs=2, kv_fraction=0.25)
    cache = latent_cache(model)
    with torch.no_grad():
        model(ids(length=30), **with_cache(cache), use_cache=True)
    held = [t for layer in cache.layers for t in walk_tensors(layer)]
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in held)
    layer = cache.layers[0]
    assert isinstance(layer, LatentLayer) and layer.latent.shape == (2, 30, 8) and layer.rope_keys.shape == (2, 2, 30, 4)
    assert cache.nbytes() == 2 * 30 * report["kv_elements_per_token"] * 2  # batch x tokens x elements x bf16
    full = DynamicCache()
    original = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2).to(torch.bfloat16)
    with torch.no_grad():
        original(ids(length=30), **with_cache(full), use_cache=True)
    full_bytes = sum(t.numel() * t.element_size() for layer in full.layers for t in walk_tensors(layer))
    assert cache.nbytes() * 4 == full_bytes
    from leanlm.evaluate.memory import memory_report

    report = memory_report(model)  # what `leanlm eval` prints: measured from a real cache, and the formula
    assert report.kv_bytes_per_token == report.kv_bytes_per_token_analytic == 16 * 2 * 2  # 2 layers x 16 elements x bf16


def test_save_reload_gives_identical_logits_and_the_engine_cache(calibration, tmp_path):
    model = tiny_qwen2(num_layers=2, num_heads=4, num_kv_heads=2)
    Transform.from_dict({"name": "latent_kv", "kv_fraction": 0.25, "rope_pairs": 2,
                         "allocation": "spectrum"}).apply(model, calibration=calibration)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    reloaded = load_model(str(save_compact(model, None, tmp_path / "latent")))
    assert all(isinstance(m, LatentAttention) for m in (layer.self_attn for layer in reloaded.model.layers))
    assert [m.latent_rank for _, m in latent_layers(reloaded)] == [m.latent_rank for _, m in latent_layers(model)]
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, before)
    assert isinstance(static_cache(reloaded, 64), LatentCache)  # `leanlm generate` asks for a static cache


@pytest.mark.parametrize("settings, fragment", [
    ({"rank": 0}, "latent rank must be at least 1"),
    ({"rope_pairs": 9}, "rope_pairs must be in [0, 8]"),
    ({"kv_fraction": 0.05, "rope_pairs": 4}, "leaves no room for a latent"),
    ({"kv_fraction": 0.0}, "kv_fraction must be in (0, 1]"),
    ({"rank": 64}, "exceeds the full rank"),
])
def test_bad_settings_give_one_clear_error(settings, fragment, calibration):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    with pytest.raises(LeanLMError, match=None) as err:
        Transform.from_dict({"name": "latent_kv", **settings}).apply(model, calibration=calibration)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not latent_layers(model)  # refused before any layer was replaced


def test_refuses_qk_norm_families_and_static_or_policy_caches(calibration):
    with pytest.raises(LeanLMError, match="key norm"):
        convert(tiny_gemma3(num_layers=2), calibration, rope_pairs=2, kv_fraction=0.25)
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    convert(model, calibration, rope_pairs=2, kv_fraction=0.25)
    from transformers import StaticCache

    with pytest.raises(LeanLMError, match="static caches and KV policies"), torch.no_grad():
        model(ids(), **with_cache(StaticCache(config=model.config, max_cache_len=32)), use_cache=True)


def test_leanlm_generate_decodes_a_saved_latent_model(capsys, tmp_path, real_tokenizer):
    from leanlm import cli

    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=len(real_tokenizer), tie_word_embeddings=True)
    vocab = torch.Generator().manual_seed(2)
    convert(model, [torch.randint(0, len(real_tokenizer), (4, 32), generator=vocab)], rope_pairs=2, kv_fraction=0.25)
    path = save_compact(model, real_tokenizer, tmp_path / "latent")
    prompt = torch.tensor([real_tokenizer("Hello world")["input_ids"]])
    tokens = generate(load_model(str(path)), prompt, 5)[0].tolist()
    if real_tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(real_tokenizer.eos_token_id) + 1]
    code = cli.main(["generate", "--model", str(path), "--dtype", "float32", "--max-new-tokens", "5", "Hello world"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.rstrip("\n") == "Hello world" + real_tokenizer.decode(tokens, skip_special_tokens=True)


LATENT_BODY = """
transforms:
  - {name: latent_kv, kv_fraction: 0.5, rope_pairs: 2}
recover:
  lora: {rank: 4, targets: [q_proj, o_proj, kv_down, k_up, v_up, k_rope]}
  distill: {steps: 2, max_minutes: null, batch_size: 2, seq_len: 32, checkpoint_every: 0}
  variants: [lora_kd]
export: {enabled: true, padded: false}
"""


def test_recipe_converts_recovers_and_exports_a_latent_model(tmp_path, tiny_model_dir):
    import json

    from leanlm import cli

    recipe = tmp_path / "latent.yaml"
    recipe.write_text(tiny_recipe("tiny-latent", tiny_model_dir, LATENT_BODY))
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["transforms"][0]["record"]["removed"]["kv_fraction_achieved"] == 0.5
    exported = load_model(str(tmp_path / "run" / "model"))
    assert [m.latent_rank for _, m in latent_layers(exported)] == [24, 24]  # 0.5 x 2 x 2 x 16 - 2 x 2 x 2
