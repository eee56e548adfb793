"""Speculative decoding on tiny models: greedy equals the target's greedy output; rejection sampling
draws from the target's distribution (chi-square, p = 0.001); bad requests raise one clear error."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from leanlm.engine import Sampler, SamplingConfig, generate, static_cache
from leanlm.engine.speculative import SpeculativeStats, speculative_generate, verify
from leanlm.errors import LeanLMError
from leanlm.kvcache import attach, make_policy
from leanlm.models import tiny_llama


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Survival function of the chi-square statistic (cells with expected count > 0)."""
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


@pytest.fixture(scope="module")
def pair():
    """A 3-layer target and a 1-layer draft sharing its embeddings, first layer and head (so drafts get accepted)."""
    target = tiny_llama(num_layers=3, num_heads=4, num_kv_heads=2, vocab_size=64, seed=0)
    draft = tiny_llama(num_layers=1, num_heads=4, num_kv_heads=2, vocab_size=64, seed=1)
    draft.model.embed_tokens.load_state_dict(target.model.embed_tokens.state_dict())
    draft.model.layers[0].load_state_dict(target.model.layers[0].state_dict())
    draft.model.norm.load_state_dict(target.model.norm.state_dict())
    draft.lm_head.load_state_dict(target.lm_head.state_dict())
    return target, draft


@pytest.fixture
def ids():
    return torch.randint(0, 64, (1, 15), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_greedy_speculative_equals_target_greedy(pair, ids, k):
    target, draft = pair
    stats = SpeculativeStats()
    reference = generate(target, ids, 25)
    assert torch.equal(speculative_generate(target, draft, ids, 25, k=k, stats=stats), reference)
    assert stats.generated == 25 and 0 <= stats.accepted <= stats.proposed == k * stats.rounds  # a model always proposes k
    assert 25 <= 1 + stats.rounds + stats.accepted <= 25 + k  # the prefill's token, then n accepted + 1 per round
    tokens = speculative_generate(target, draft, ids, 25, k=k, target_cache=DynamicCache())  # the forward verifies
    assert torch.equal(tokens, reference)


def test_a_draft_equal_to_the_target_is_always_accepted(pair, ids):
    target, _ = pair
    stats = SpeculativeStats()
    speculative_generate(target, target, ids, 20, k=3, stats=stats, sampling=SamplingConfig(temperature=1.0, top_k=0))
    assert stats.acceptance_rate == 1.0


def test_rejection_sampling_reproduces_the_target_distribution():
    """verify() on fixed distributions: the first output token follows p, not q (20,000 rounds)."""
    vocab, rounds = 6, 20_000
    p = torch.tensor([[0.05, 0.3, 0.1, 0.25, 0.2, 0.1], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])  # (k+1, vocab)
    q = torch.tensor([[0.4, 0.05, 0.3, 0.05, 0.1, 0.1]])  # (k, vocab), far from p
    sampler = Sampler(SamplingConfig(temperature=1.0, top_k=0, seed=11))
    drafted = sampler.draw(q.expand(rounds, vocab))  # (rounds,)
    counts = torch.zeros(vocab, dtype=torch.float64)
    for d in drafted.tolist():
        n, following = verify(p, q, torch.tensor([d]), sampler)
        counts[d if n == 1 else following] += 1
    assert chi_square_p_value(counts, p[0].double() * rounds) > 0.001
    assert chi_square_p_value(counts, q[0].double() * rounds) < 0.001  # the test can tell p from q


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_speculative_sampling_matches_the_target_model_distribution(pair, drafter):
    """End to end: the joint law of the first two new tokens equals the target's (exact, by enumeration),
    with a draft model's distributions or the n-gram drafter's certain proposals (here: 2, 7 after 1, 5)."""
    target, draft = pair
    target, draft = _narrow(target, 8), (_narrow(draft, 8) if drafter == "model" else "ngram")
    ids = torch.tensor([[1, 5, 2, 7, 1, 5]])
    config = SamplingConfig(temperature=1.5, top_k=0)
    with torch.no_grad():
        first = target(ids).logits[0, -1].div(1.5).softmax(-1).double()  # (8,)
        following = torch.stack([target(torch.cat([ids, torch.tensor([[t]])], 1)).logits[0, -1] for t in range(8)])
        joint = first[:, None] * following.div(1.5).softmax(-1).double()  # (8, 8)
    counts = torch.zeros(8, 8, dtype=torch.float64)
    runs, stats = 1500, SpeculativeStats()
    for seed in range(runs):
        a, b = speculative_generate(target, draft, ids, 2, k=2, sampling=SamplingConfig(1.5, 0, 1.0, seed),
                                    stats=stats)[0].tolist()
        counts[a, b] += 1
    expected = joint * runs
    merged = expected < 5  # pool rare cells so the chi-square approximation holds
    counts_m = torch.cat([counts[~merged], counts[merged].sum()[None]])
    expected_m = torch.cat([expected[~merged], expected[merged].sum()[None]])
    assert chi_square_p_value(counts_m, expected_m) > 0.001
    assert stats.proposed >= runs and 0 < stats.accepted < stats.proposed  # drafts were made, kept and rejected


def _narrow(model, vocab: int):
    """The same model restricted to its first ``vocab`` tokens (a tiny vocabulary for exact enumeration)."""
    narrowed = tiny_llama(num_layers=len(model.model.layers), num_heads=4, num_kv_heads=2, vocab_size=vocab)
    state = {k: (v[:vocab] if k in ("model.embed_tokens.weight", "lm_head.weight") else v)
             for k, v in model.state_dict().items()}
    narrowed.load_state_dict(state)
    return narrowed


def test_bad_requests_raise_one_clear_error(pair, ids):
    target, draft = pair
    with pytest.raises(LeanLMError, match="at least one token"):
        speculative_generate(target, draft, ids, 5, k=0)
    other = tiny_llama(num_layers=1, num_heads=4, num_kv_heads=2, vocab_size=80)
    with pytest.raises(LeanLMError, match="vocabulary"):
        speculative_generate(target, other, ids, 5)
    with pytest.raises(LeanLMError, match="longer than the model's context"):
        speculative_generate(target, draft, torch.zeros((1, target.config.max_position_embeddings + 1),
                                                        dtype=torch.long), 5)
    with attach(target, make_policy("sink_window", 1.0, 64)) as cache, pytest.raises(LeanLMError, match="rolls"):
        speculative_generate(target, draft, ids, 5, target_cache=cache)
    with pytest.raises(LeanLMError, match="one prompt"):
        speculative_generate(target, draft, ids.expand(2, -1), 5)
    with pytest.raises(LeanLMError, match="holds"):
        speculative_generate(target, draft, ids, 5, k=2, target_cache=static_cache(target, ids.shape[1] + 7))
    with pytest.raises(LeanLMError, match="'ngram'"):
        speculative_generate(target, "bigram", ids, 5)
