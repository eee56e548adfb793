"""The decode engine on tiny models: HF-identical greedy output through every cache, batched decode
with left-padding, the compiled step, the sampler's rules, and clear errors for bad requests."""

from __future__ import annotations

import pytest
import torch
from kv_helpers import tiny_kv_model
from transformers import DynamicCache

from leanlm.engine import Sampler, SamplingConfig, generate, left_pad, static_cache, stream
from leanlm.errors import LeanLMError
from leanlm.kvcache import CACHE_POLICIES, attach, make_policy

NEW = 12


@pytest.fixture(scope="module")
def model():
    return tiny_kv_model()


@pytest.fixture
def ids():
    return torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))


def hf_greedy(model, ids, new=NEW):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         min_new_tokens=new, pad_token_id=0)
    return out[:, ids.shape[1]:]


def test_greedy_equals_hf_generate_with_the_full_and_static_cache(model, ids):
    reference = hf_greedy(model, ids)
    assert torch.equal(generate(model, ids, NEW), reference)
    assert torch.equal(generate(model, ids, NEW, cache=static_cache(model, ids.shape[1] + NEW)), reference)
    assert torch.equal(generate(model, ids, NEW, prefill_chunk=7), reference)  # chunked prefill


@pytest.mark.parametrize("name", sorted(CACHE_POLICIES))
def test_greedy_equals_hf_generate_through_every_policy_at_full_budget(model, ids, name):
    with attach(model, make_policy(name, 1.0, ids.shape[1] + NEW, group=16)) as cache:
        tokens = generate(model, ids, NEW, cache=cache, prefill_chunk=8)
    assert torch.equal(tokens, hf_greedy(model, ids))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_batched_left_padded_decode_equals_each_sequence_alone(model, kind):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], list(range(100, 113))]
    ids, mask = left_pad(prompts)
    cache = static_cache(model, ids.shape[1] + NEW) if kind == "static" else DynamicCache()
    batched = generate(model, ids, NEW, cache=cache, attention_mask=mask, prefill_chunk=5)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row], generate(model, torch.tensor([prompt]), NEW)[0]), row


def test_compiled_step_equals_eager_step(ids):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable in this torch")
    model = tiny_kv_model()  # its own model: compiled functions are kept per model
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    eager = generate(model, ids, 6, cache=static_cache(model, ids.shape[1] + 6))
    compiled = generate(model, ids, 6, cache=static_cache(model, ids.shape[1] + 6), compile=True)
    from leanlm.engine.compile import _failed

    if model in _failed:
        pytest.skip("torch.compile failed on this machine (the engine fell back to eager decoding)")
    assert torch.equal(compiled, eager)


def test_lean_step_compiles_once_per_model_and_wrapper_choice():
    """Inductor's C++ wrapper (the default unless LEANLM_CPP_WRAPPER=0) and the Python wrapper (``use_cpp_wrapper(False)``, the
    benchmarks' A/B) gets its own compiled function instead of reusing the other one."""
    from leanlm.engine.compile import use_cpp_wrapper
    from leanlm.engine.lean_step import LeanStep

    model = tiny_kv_model()
    with use_cpp_wrapper(True):
        first, again = LeanStep(model, compile=True), LeanStep(model, compile=True)
    with use_cpp_wrapper(False):
        python_wrapper = LeanStep(model, compile=True)
    assert first.function() is again.function() and first.function() is not python_wrapper.function()
    assert first.function(chain=True) is again.function(chain=True)


def test_compile_with_a_dynamic_cache_falls_back_to_eager(model, ids, caplog):
    tokens = generate(model, ids, NEW, cache=DynamicCache(), compile=True)
    assert torch.equal(tokens, hf_greedy(model, ids))
    assert "needs a static cache" in caplog.text


def test_sampler_top_k_and_top_p_keep_exactly_the_expected_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = Sampler(SamplingConfig(temperature=1.0, top_k=2, top_p=1.0)).probs(logits)
    assert torch.allclose(probs[0, :2], torch.tensor([4.0, 3.0]).softmax(-1)) and probs[0, 2:].sum() == 0
    full = logits.softmax(-1)[0]  # top-p 0.8: the two likeliest hold 0.6439+0.2369 >= 0.8, so three are too many
    kept = Sampler(SamplingConfig(temperature=1.0, top_k=0, top_p=0.8)).probs(logits)[0]
    assert (kept > 0).tolist() == [True, True, False, False, False] and full[:1].sum() < 0.8 <= full[:2].sum()
    greedy = Sampler().probs(logits)
    assert greedy.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]


def test_sampling_is_seeded_and_follows_the_distribution(model, ids):
    config = SamplingConfig(temperature=1.0, top_k=0, seed=7)
    assert torch.equal(generate(model, ids, 8, sampling=config), generate(model, ids, 8, sampling=config))
    draws = Sampler(SamplingConfig(temperature=1.0, top_k=0, seed=1)).draw(torch.tensor([[0.2, 0.8]]).expand(4000, 2))
    assert abs(draws.float().mean().item() - 0.8) < 0.03  # 4000 draws: sd 0.0063


def test_eos_stops_every_sequence(model, ids):
    tokens = generate(model, ids, NEW)
    eos = int(tokens[0, 3])
    stopped = generate(model, ids, NEW, eos_token_id=eos)
    assert stopped.shape[1] == tokens[0].tolist().index(eos) + 1


def test_bad_requests_raise_one_clear_error(model, ids):
    with pytest.raises(LeanLMError, match="longer than the model's context"):
        generate(model, torch.zeros((1, model.config.max_position_embeddings + 1), dtype=torch.long), 1)
    with pytest.raises(LeanLMError, match="static cache holds"):
        generate(model, ids, NEW, cache=static_cache(model, ids.shape[1]))
    with pytest.raises(LeanLMError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0).validate()
    ids2, mask = left_pad([[1, 2, 3], [4]])
    with attach(model, make_policy("sink_window", 1.0, 16)) as cache, pytest.raises(LeanLMError, match="equal-length"):
        list(stream(model, ids2, 2, cache, attention_mask=mask))
