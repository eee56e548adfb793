import json

import pytest
import torch

from leanlm.errors import LeanLMError
from leanlm.models import BUNDLED, ModelSpec, load_model, tiny_llama


def test_tiny_mha_and_gqa_specs():
    mha = ModelSpec.from_model(tiny_llama(num_layers=2, num_heads=4))
    gqa = ModelSpec.from_model(tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8))
    assert (mha.num_layers, mha.num_heads, mha.num_kv_heads, mha.head_dim) == (2, 4, 4, 16)
    assert (gqa.num_layers, gqa.num_heads, gqa.num_kv_heads, gqa.head_dim) == (3, 4, 2, 8)
    assert gqa.heads_per_layer == (4, 4, 4) and gqa.kv_heads_per_layer == (2, 2, 2)
    assert gqa.total_heads == 12 and gqa.uniform


def test_spec_from_config_matches_modules():
    model = tiny_llama(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=8, intermediate_size=96)
    assert ModelSpec.from_config(model.config) == ModelSpec.from_model(model)


def test_spec_reads_module_shapes_not_config():
    # A model whose layer 1 lost a KV group must report it (what pruning will produce).
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    attn = model.model.layers[1].self_attn
    attn.k_proj = torch.nn.Linear(64, 16, bias=False)
    spec = ModelSpec.from_model(model)
    assert spec.kv_heads_per_layer == (2, 1) and not spec.uniform


def test_unknown_model_is_a_clear_error():
    with pytest.raises(LeanLMError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(LeanLMError, match="no config.json"):
        load_model(str(tmp_path))


def test_non_gguf_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "weights.txt"
    bad.write_text("not a model")
    with pytest.raises(LeanLMError, match="not a .gguf"):
        load_model(str(bad))


def test_corrupt_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{ this is not json")
    with pytest.raises(LeanLMError, match="could not load model"):
        load_model(str(tmp_path))


def test_local_directory_round_trip(tmp_path):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    model.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.real_model
def test_gguf_model_exports_and_reloads_with_identical_logits(tmp_path):
    gguf = BUNDLED["smollm2-135m"].path()
    model = load_model(str(gguf))  # straight from the GGUF file, dequantized to float32
    spec = ModelSpec.from_model(model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    assert (spec.hidden_size, spec.vocab_size) == (576, 49152)
    model.save_pretrained(tmp_path)  # would raise if the GGUF quantizer were still attached
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = load_model(str(tmp_path))
    ids = torch.tensor([[1, 504, 3458, 282, 260, 3567, 30, 378, 4436, 314]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
        # The cached bundled copy is the same model too.
        assert torch.equal(model(ids).logits, load_model("smollm2-135m")(ids).logits)


def test_gguf_parts_are_assembled_in_order_and_digest_checked(tmp_path):
    import hashlib

    from leanlm.sources import _assemble

    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"GGUF" + b"1" * 10)
    parts[1].write_bytes(b"2" * 7)
    whole = b"GGUF" + b"1" * 10 + b"2" * 7
    target = tmp_path / "out" / "m.gguf"
    _assemble(parts, target, hashlib.sha256(whole).hexdigest())
    assert target.read_bytes() == whole
    with pytest.raises(LeanLMError, match="assemble to sha256"):
        _assemble(parts[::-1], tmp_path / "bad.gguf", hashlib.sha256(whole).hexdigest())
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".bad.gguf-*"))


def test_bundled_models_name_their_packages():
    assert {"smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"} <= set(BUNDLED)
    assert len(BUNDLED["qwen2.5-0.5b"].parts) == 6 and len(BUNDLED["gemma3-270m"].parts) == 4
