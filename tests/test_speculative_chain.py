"""Speculative verification through the lean step (``LeanStep.chain``), rewinding, and n-gram drafting:
a chain of tokens gives bit for bit the logits of one-token steps; the attention kernel's per-row
lengths over a shared cache equal separate calls; the n-gram drafter proposes what the text says;
greedy speculative decoding with either drafter equals the engine's greedy output (tiny and real model)."""

from __future__ import annotations

import pytest
import torch

from leanlm.data.wikitext import wikitext_text
from leanlm.engine import kernels, static_cache
from leanlm.engine.decode import generate, prefill, start_state
from leanlm.engine.drafters import Drafter, NgramDrafter
from leanlm.engine.lean_step import lean_step
from leanlm.engine.sampling import Sampler
from leanlm.engine.speculative import ProposalGate, SpeculativeStats, speculative_generate
from leanlm.errors import LeanLMError
from leanlm.kvcache import attach, make_policy
from leanlm.models import tiny_llama

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="leanlm's CPU kernels cannot be built here")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first", [61, 126])  # 61: rows 0-2 end in the first 64-slot block (the second is empty for them)
def test_a_chain_over_a_shared_cache_equals_one_call_per_row(dtype, first):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 6, 64, generator=gen).to(dtype)  # 5 consecutive tokens, 6 query heads over 2 kv heads
    keys, values = (torch.randn(1, 2, 150, 64, generator=gen).to(dtype) for _ in range(2))
    lengths = torch.arange(first, first + 5)
    chain = torch.ops.leanlm.decode_attention(q, keys, values, lengths, None, 0.125)
    for row in range(5):
        alone = torch.ops.leanlm.decode_attention(q[row: row + 1], keys, values, lengths[row: row + 1], None, 0.125)
        assert torch.equal(chain[row], alone[0])
    with pytest.raises(RuntimeError, match="one per query row"):
        torch.ops.leanlm.decode_attention(q, keys, values, lengths[:3], None, 0.125)


def _prefilled(model, prompt, room):
    cache = static_cache(model, room)
    state = start_state(model, prompt, None, cache, room)
    with torch.inference_mode():
        prefill(model, prompt, state)
    return cache, state


@pytest.mark.parametrize("kernel", ["default", "avx2", "off"])  # avx2: the bf16 matmul's AVX2 path even on AVX-512 CPUs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chain_gives_the_logits_of_one_token_steps_and_rewinds(kernel, dtype):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, seed=5).to(dtype)
    prompt = torch.randint(0, 100, (1, 62), generator=torch.Generator().manual_seed(1))  # the chain fills slots 62-65
    tokens = torch.tensor([[5, 9, 2, 33]])
    # bf16 through the kernels (the CPU decode path): bit for bit; float32 linears are ATen's (GEMM vs GEMV sums)
    exact = torch.equal if kernel != "off" and dtype == torch.bfloat16 else (
        lambda a, b: torch.allclose(a, b, atol=1e-5 if dtype == torch.float32 else 2e-2))
    with kernels.use_kernels(kernel != "off"), kernels.use_avx512(kernel != "avx2"), torch.inference_mode():
        chain_cache, chain_state = _prefilled(model, prompt, 80)
        step_cache, step_state = _prefilled(model, prompt, 80)
        step = lean_step(model, chain_cache)
        chained = step.chain(tokens, chain_state)  # (4, vocab)
        assert chained.shape == (4, model.config.vocab_size)
        single = torch.cat([step(tokens[:, i: i + 1], step_state) for i in range(4)])
        assert exact(chained, single)
        chain_state.rewind(3)  # 9, 2, 33 rejected: continue after prompt + 5 with other tokens
        assert chain_state.seen == 63 and int(chain_cache.layers[0].cumulative_length) == 63
        fresh_cache, fresh_state = _prefilled(model, prompt, 80)  # a cache that never saw 9, 2, 33
        step(tokens[:, :1], fresh_state)
        again = step.chain(torch.tensor([[7, 8]]), chain_state)
        single = torch.cat([step(torch.tensor([[t]]), fresh_state) for t in (7, 8)])
        assert exact(again, single)
        assert exact(chain_cache.layers[1].keys[:, :, :65], fresh_cache.layers[1].keys[:, :, :65])
        with pytest.raises(LeanLMError, match="holds 80"):
            step.chain(torch.zeros((1, 16), dtype=torch.long), chain_state)  # 65 + 16 > 80


def test_what_cannot_rewind_or_chain_says_so():
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    prompt = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    cache, state = _prefilled(model, prompt, 12)
    with pytest.raises(LeanLMError, match="one unpadded sequence"):
        lean_step(model, cache).chain(torch.tensor([[1, 2]]), state)  # a batch of two sequences
    with attach(model, make_policy("sink_window", 1.0, 64)) as policy_cache:
        policy_state = start_state(model, prompt[:1], None, policy_cache, 12)
        with pytest.raises(LeanLMError, match="holding 0"):
            policy_state.rewind(1)
        policy_state.advance(2)
        with pytest.raises(LeanLMError, match="cannot drop"):
            policy_state.rewind(1)


def test_the_ngram_drafter_continues_the_text_as_it_went_on_before():
    sampler = Sampler()
    drafter = NgramDrafter(max_n=3, min_n=1)
    # the tail (1, 2, 3) was followed by 4; then (2, 3, 4) by 1; then (3, 4, 1) by 2
    assert drafter.propose([1, 2, 3, 4, 1, 2, 3], 3, sampler) == ([4, 1, 2], None)
    drafter.start(0)
    assert drafter.propose([1, 2, 1, 3, 1], 1, sampler) == ([3], None)  # the latest occurrence of 1 wins
    drafter.start(0)
    assert drafter.propose([5, 6, 7], 2, sampler) == ([], None)  # nothing seen before: no proposal
    assert NgramDrafter(max_n=2, min_n=2).propose([5, 6, 5], 2, sampler) == ([], None)  # (6, 5) is new
    assert NgramDrafter(max_n=2, min_n=1).propose([5, 6, 5], 3, sampler) == ([6, 5, 6], None)
    with pytest.raises(LeanLMError, match="min_n"):
        NgramDrafter(max_n=1, min_n=2)
    with pytest.raises(LeanLMError, match="min_rate"):
        ProposalGate(min_rate=0.5, window=2)


@pytest.mark.parametrize("compile", [False, True])
def test_ngram_speculative_greedy_equals_the_engine(compile):
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=64, seed=2)
    prompt = torch.tensor([[3, 8, 1, 9, 4] * 6])  # repeats: the drafter has matches, the model may follow them
    reference = generate(model, prompt, 30)
    stats = SpeculativeStats()
    tokens = speculative_generate(model, "ngram", prompt, 30, k=3, stats=stats, compile=compile)
    assert torch.equal(tokens, reference)
    assert stats.proposed > 0 and 30 <= 1 + stats.rounds + stats.accepted <= 33


@pytest.mark.real_model
@needs_kernels
@pytest.mark.parametrize("avx512", [True, False])
def test_real_model_ngram_speculative_equals_plain_greedy_token_for_token(real_model_bf16, real_tokenizer, avx512):
    """bf16 SmolLM2: the chain's rows are computed as one-token steps are, so even near-tied logits agree."""
    ids = torch.tensor([real_tokenizer(wikitext_text("test")[20000:22000])["input_ids"][:200]])
    stats = SpeculativeStats()
    with kernels.use_avx512(avx512):
        reference = generate(real_model_bf16, ids, 48)
        assert torch.equal(speculative_generate(real_model_bf16, "ngram", ids, 48, k=4, stats=stats), reference)
    assert stats.accepted > 0


class _WrongDrafter(Drafter):
    """Free proposals the target never takes."""

    free = True

    def __init__(self, token: int):
        self.token = token

    def propose(self, committed, k, sampler):
        return [self.token] * k, None


def test_the_gate_holds_back_proposals_that_are_never_taken():
    gate = ProposalGate(min_rate=0.25, window=8)
    assert gate.open()
    for taken in (False, False, False, True):
        gate.record(taken)
    assert gate.open()  # 1 of 4 taken: at the rate
    gate.record(False)
    assert not gate.open()  # 1 of 5
    gate.record(True)
    assert gate.open()  # 2 of 6
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=64, seed=2)
    prompt = torch.tensor([[3, 8, 1, 9, 4] * 4])
    reference = generate(model, prompt, 30)
    never = next(t for t in range(64) if t not in reference[0].tolist())
    stats = SpeculativeStats()
    assert torch.equal(speculative_generate(model, _WrongDrafter(never), prompt, 30, k=3, stats=stats), reference)
    assert stats.skipped == stats.rounds - 4 and stats.proposed == 4 * 3  # four tries, then plain steps
    always = SpeculativeStats()
    speculative_generate(model, _WrongDrafter(never), prompt, 30, k=3, stats=always, gate=ProposalGate(min_rate=0))
    assert always.skipped == 0 and always.accepted == 0 and always.rounds == 29


def test_bad_speculative_requests_say_so():
    model = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=64, seed=2)
    prompt = torch.tensor([[3, 8, 1, 9, 4]])
    with pytest.raises(LeanLMError, match="max_new_tokens"):
        speculative_generate(model, "ngram", prompt, -1)

    class TooMany(_WrongDrafter):
        def propose(self, committed, k, sampler):
            return [self.token] * (k + 1), None

    with pytest.raises(LeanLMError, match="at most k = 3"):
        speculative_generate(model, TooMany(1), prompt, 10, k=3)
