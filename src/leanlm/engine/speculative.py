"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one forward.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft token d_i, drawn from the draft's
distribution q_i, is kept with probability min(1, p_i(d_i) / q_i(d_i)) under the target's p_i; the
first rejected one is replaced by a draw from normalise(max(0, p_i - q_i)); if all k are kept, one
more token comes from p_{k+1}. The output then follows the target's distribution exactly. Greedy is
the same rule on one-hot distributions: a draft token is kept iff it is the target's argmax, so the
output is the target's greedy output token for token.

Both caches are rolled back with ``Cache.crop`` after each round (a DynamicCache or a static cache;
policy caches cannot be cropped). Batch 1 only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from leanlm.engine.decode import model_context
from leanlm.engine.sampling import Sampler, SamplingConfig
from leanlm.engine.static_cache import capacity
from leanlm.errors import LeanLMError
from leanlm.models.compat import with_cache


@dataclass
class SpeculativeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    generated: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"acceptance_rate": self.acceptance_rate}


def check_pair(target: nn.Module, draft: nn.Module, k: int) -> None:
    if k < 1:
        raise LeanLMError(f"the draft must propose at least one token per round (draft tokens >= 1), got {k}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise LeanLMError(f"the draft's vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                          f"({target.config.vocab_size}): it needs the same tokenizer")


def verify(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, sampler: Sampler) -> tuple[int, int]:
    """Rejection-sample one round. p: (k+1, vocab) target probs, q: (k, vocab) draft probs, drafted: (k,).

    Returns (n accepted draft tokens, the token that follows them).
    """
    k = drafted.shape[0]
    steps = torch.arange(k, device=drafted.device)
    p_d, q_d = p[steps, drafted], q[steps, drafted]  # (k,) probability of each draft token under each model
    u = torch.rand(k, generator=sampler.generator(p.device), device=p.device)
    rejected = (u * q_d >= p_d).nonzero()  # keep d_i iff u < p/q, written without dividing by q
    n = int(rejected[0, 0]) if rejected.numel() else k
    if n == k:
        return n, int(sampler.draw(p[k:]))
    residual = (p[n] - q[n]).clamp(min=0)  # (vocab,)
    if float(residual.sum()) <= 0:  # p == q at this step: any draw from p is exact
        residual = p[n]
    return n, int(sampler.draw((residual / residual.sum())[None]))


def _forward(model, ids: torch.Tensor, cache, keep: int) -> torch.Tensor:
    """(1, q) ids after what ``cache`` holds → (keep, vocab) logits of the last ``keep`` positions."""
    start = int(cache.get_seq_length())
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]  # (1, q)
    out = model(ids, **with_cache(cache), position_ids=positions, use_cache=True, logits_to_keep=keep)
    return out.logits[0]


def _crop(cache, tokens: int) -> None:
    if tokens > 0:
        cache.crop(-tokens)


def speculative_generate(target: nn.Module, draft: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int,
                         k: int = 4, sampling: SamplingConfig | Sampler | None = None, target_cache=None,
                         draft_cache=None, prefill_chunk: int = 512,
                         stats: SpeculativeStats | None = None) -> torch.Tensor:
    """(1, max_new_tokens) tokens that follow the target's distribution (greedy: its exact output)."""
    check_pair(target, draft, k)
    if prompt_ids.shape[0] != 1:
        raise LeanLMError(f"speculative decoding takes one prompt at a time, got a batch of {prompt_ids.shape[0]}")
    if prompt_ids.shape[1] > model_context(target):
        raise LeanLMError(f"the prompt has {prompt_ids.shape[1]} tokens, longer than the model's context of "
                          f"{model_context(target)}")
    for cache in (target_cache, draft_cache):
        if hasattr(cache, "next_position_ids") or (cache is not None and not getattr(cache, "is_croppable", True)):
            raise LeanLMError("speculative decoding rolls its caches back: use a DynamicCache or a static cache")
        room = capacity(cache)
        if room is not None and room < prompt_ids.shape[1] + max_new_tokens + k + 1:
            raise LeanLMError(f"a static cache for speculative decoding needs prompt + new + k + 1 = "
                              f"{prompt_ids.shape[1] + max_new_tokens + k + 1} tokens, this one holds {room}")
    sampler = sampling if isinstance(sampling, Sampler) else Sampler(sampling)
    stats = stats if stats is not None else SpeculativeStats()
    target_cache = DynamicCache() if target_cache is None else target_cache
    draft_cache = DynamicCache() if draft_cache is None else draft_cache
    out: list[int] = []
    with torch.inference_mode():
        for part in prompt_ids.split(prefill_chunk, dim=1):
            logits = _forward(target, part, target_cache, 1)
            _forward(draft, part, draft_cache, 1)
        pending = int(sampler.sample(logits))  # in neither cache yet
        draft_pending = [pending]
        out.append(pending)
        while len(out) < max_new_tokens:
            drafted, q = _propose(draft, draft_cache, draft_pending, k, sampler)
            chunk = torch.tensor([[pending, *drafted.tolist()]], device=prompt_ids.device)  # (1, k+1)
            p = sampler.probs(_forward(target, chunk, target_cache, k + 1))  # (k+1, vocab)
            n, following = verify(p, q, drafted, sampler)
            _crop(target_cache, k - n)  # keep pending + n accepted
            if n == k:  # the draft never saw its own last token
                draft_pending = [int(drafted[-1]), following]
            else:
                _crop(draft_cache, k - 1 - n)
                draft_pending = [following]
            out += [*drafted[:n].tolist(), following]
            pending = following
            stats.rounds, stats.proposed, stats.accepted = stats.rounds + 1, stats.proposed + k, stats.accepted + n
            stats.accepted_per_round.append(n)
    out = out[:max_new_tokens]
    stats.generated += len(out)
    return torch.tensor([out], device=prompt_ids.device)


def _propose(draft, cache, pending: list[int], k: int, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """k draft tokens after ``pending`` (tokens not yet in the draft's cache) and their (k, vocab) probs."""
    device = next(draft.parameters()).device
    ids = torch.tensor([pending], device=device)  # (1, len(pending))
    tokens, probs = [], []
    for _ in range(k):
        q = sampler.probs(_forward(draft, ids, cache, 1))  # (1, vocab)
        token = q.argmax(-1) if sampler.config.greedy else sampler.draw(q)  # (1,)
        tokens.append(token)
        probs.append(q)
        ids = token[None]  # (1, 1)
    return torch.cat(tokens), torch.cat(probs)  # (k,), (k, vocab)
