"""Shared fixtures: tiny random Llama models (fast) and the bundled real model (marked real_model)."""

from __future__ import annotations

import pytest
import torch

from leanlm.models import load_model, load_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def model():
    """The KV-cache tests' tiny GQA model (kv_helpers.tiny_kv_model), one per test module."""
    from kv_helpers import tiny_kv_model

    return tiny_kv_model()


@pytest.fixture
def tiny_mha():
    return tiny_llama(num_layers=2, num_heads=4, num_kv_heads=None)


@pytest.fixture
def tiny_gqa():
    return tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2)


@pytest.fixture
def random_ids():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def real_tokenizer():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def real_model_bf16():
    return load_model("smollm2-135m", dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_tokenizer):
    """A tiny random Llama with the real tokenizer's vocabulary, saved like any local checkpoint."""
    path = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=len(real_tokenizer), tie_word_embeddings=True)
    model.save_pretrained(path)
    real_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """Grad mode is thread-global: a test (or the code under it) that leaves it off breaks every later test that
    trains, far from the cause (e.g. a generator suspended inside ``inference_mode`` and closed after it)."""
    yield
    leaked = torch.is_inference_mode_enabled() or not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left torch's grad mode off or inference mode on"
