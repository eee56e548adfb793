"""Speculative decoding: a drafter proposes k tokens, the target checks them in one forward.

Rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft token d_i, drawn from the draft's
distribution q_i, is kept with probability min(1, p_i(d_i) / q_i(d_i)) under the target's p_i; the
first rejected one is replaced by a draw from normalise(max(0, p_i - q_i)); if all k are kept, one
more token comes from p_{k+1}. The output then follows the target's distribution exactly. Greedy is
the same rule on one-hot distributions: a draft token is kept iff it is the target's argmax, so the
output is the target's greedy output token for token.

The drafter (``engine/drafters.py``) is a draft model or n-gram lookup in the text itself. Where the
lean step runs the target (a Llama-family model over a static cache), the k + 1 tokens of a round go
through it as one chain (``LeanStep.chain``): the same kernels as a one-token step, row by row, so the
greedy output equals the plain engine's bit for bit, and the rejected tokens are rewound by moving the
cache's count back. Elsewhere the model's forward verifies over a DynamicCache, cropped. Batch 1 only.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from leanlm.engine.decode import model_context, prefill, forward, start_state
from leanlm.engine.drafters import Drafter, ModelDrafter, make_drafter
from leanlm.engine.lean_step import lean_step, runs_lean
from leanlm.engine.sampling import Sampler, SamplingConfig
from leanlm.engine.static_cache import capacity, static_cache, window_layers
from leanlm.engine.streaming_linear import enable_streaming_linears
from leanlm.errors import LeanLMError


@dataclass
class SpeculativeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    generated: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    skipped: int = 0  # rounds whose proposal the gate held back (a plain step instead)
    padded: int = 0  # of ``proposed``: filler tokens that kept a compiled chain at k (a short n-gram proposal)
    decode_seconds: float = 0.0  # from the first new token (after the target's prefill) to the last

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"acceptance_rate": self.acceptance_rate}


def check_pair(target: nn.Module, drafter: Drafter, k: int) -> None:
    if k < 1:
        raise LeanLMError(f"the draft must propose at least one token per round (draft tokens >= 1), got {k}")
    if isinstance(drafter, ModelDrafter) and target.config.vocab_size != drafter.vocab_size:
        raise LeanLMError(f"the draft's vocabulary ({drafter.vocab_size} tokens) differs from the target's "
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


def verify_greedy(logits: torch.Tensor, drafted: list[int]) -> tuple[int, int]:
    """Greedy rounds: ``drafted`` tokens are kept while each is the target's argmax ((k+1, vocab) logits)."""
    best = logits.argmax(-1).tolist()
    n = 0
    while n < len(drafted) and drafted[n] == best[n]:
        n += 1
    return n, best[n]


class ProposalGate:
    """Whether a free drafter's proposals are worth a chained forward. A chain of k + 1 rows costs more
    than a one-token step (~0.1 step per extra row here: the rows share the weight stream, not the
    arithmetic), so proposals that are rarely taken make decoding slower (n-gram drafting on sampled
    text: 0.85x). The gate watches how often the first proposed token turned out to be the next token,
    over the last ``window`` proposals (the first ``TRIES`` always pass), whether verified or held back (a held-back proposal is checked
    against the token the plain step then produced: free, since the n-gram drafter costs nothing), and
    lets proposals through while that share is at least ``min_rate``. The decision depends on past
    tokens only, so the output's distribution (and greedy output) is unchanged."""

    TRIES = 4  # proposals let through before the share is read

    def __init__(self, min_rate: float = 0.25, window: int = 16):
        if not 0 <= min_rate <= 1 or window < self.TRIES:
            raise LeanLMError(f"the proposal gate needs min_rate in [0, 1] and window >= {self.TRIES}, got {min_rate}, {window}")
        self.min_rate, self.seen = min_rate, deque(maxlen=window)

    def open(self) -> bool:
        return len(self.seen) < self.TRIES or sum(self.seen) >= self.min_rate * len(self.seen)

    def record(self, first_taken: bool) -> None:
        self.seen.append(first_taken)


def _check_request(target, prompt_ids: torch.Tensor, max_new_tokens: int, k: int, cache) -> None:
    if max_new_tokens < 0:
        raise LeanLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if window_layers(target):
        raise LeanLMError("speculative decoding cannot roll back a swapped model's sliding-window rings")
    if prompt_ids.shape[0] != 1:
        raise LeanLMError(f"speculative decoding takes one prompt at a time, got a batch of {prompt_ids.shape[0]}")
    if prompt_ids.shape[1] > model_context(target):
        raise LeanLMError(f"the prompt has {prompt_ids.shape[1]} tokens, longer than the model's context of "
                          f"{model_context(target)}")
    if hasattr(cache, "next_position_ids") or (cache is not None and not getattr(cache, "is_croppable", True)):
        raise LeanLMError("speculative decoding rolls its cache back: use a DynamicCache or a static cache")
    room = capacity(cache)
    if room is not None and room < prompt_ids.shape[1] + max_new_tokens + k + 1:
        raise LeanLMError(f"a static cache for speculative decoding needs prompt + new + k + 1 = "
                          f"{prompt_ids.shape[1] + max_new_tokens + k + 1} tokens, this one holds {room}")


class _Target:
    """The target's side of a round: (1, q) tokens → (q, vocab) logits, then the rejected ones forgotten."""

    def __init__(self, model, prompt_ids, cache, total: int, compile: bool):
        self.model = model
        self.state = start_state(model, prompt_ids, None, cache, total)
        self.step = lean_step(model, cache, compile) if capacity(cache) is not None else None

    @property
    def compiled(self) -> bool:  # what runs now (a failed compilation falls back to eager)
        return self.step is not None and self.step.compile

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if self.step is None:
            return forward(self.model, ids, self.state, keep=ids.shape[1])[0]
        return self.step(ids, self.state) if ids.shape[1] == 1 else self.step.chain(ids, self.state)


def speculative_generate(target: nn.Module, draft: nn.Module | Drafter | str, prompt_ids: torch.Tensor,
                         max_new_tokens: int, k: int = 4, sampling: SamplingConfig | Sampler | None = None,
                         target_cache=None, prefill_chunk: int = 512, compile: bool = False,
                         stats: SpeculativeStats | None = None, gate: ProposalGate | None = None) -> torch.Tensor:
    """(1, max_new_tokens) tokens that follow the target's distribution (greedy: its exact output).
    ``draft``: a model with the target's tokenizer, a ``Drafter``, or ``"ngram"`` (prompt lookup).
    ``gate``: when a free drafter's proposals are verified (``ProposalGate(min_rate=0)``: always)."""
    drafter = make_drafter(draft, compile)
    check_pair(target, drafter, k)
    _check_request(target, prompt_ids, max_new_tokens, k, target_cache)
    total = prompt_ids.shape[1] + max_new_tokens + k + 1
    if target_cache is None:
        target_cache = static_cache(target, total) if runs_lean(target) else DynamicCache()
    sampler = sampling if isinstance(sampling, Sampler) else Sampler(sampling)
    stats = stats if stats is not None else SpeculativeStats()
    gate = gate if gate is not None else ProposalGate()
    enable_streaming_linears(target)
    device = prompt_ids.device
    with torch.inference_mode():
        checker = _Target(target, prompt_ids, target_cache, total, compile)
        drafter.start(total)
        committed = prompt_ids[0].tolist()
        out = [int(sampler.sample(prefill(target, prompt_ids, checker.state, prefill_chunk)))]
        drafter.propose(committed, 0, sampler)  # the drafter reads the prompt (a draft model's prefill)
        began = time.perf_counter()
        while len(out) < max_new_tokens:
            proposal, q = drafter.propose(committed + out, k, sampler)
            if len(proposal) > k or (q is not None and q.shape[0] != len(proposal)):
                raise LeanLMError(f"the drafter proposed {len(proposal)} tokens (at most k = {k}) with "
                                  f"{None if q is None else q.shape[0]} distributions")
            drafted = proposal if not drafter.free or gate.open() else []
            if checker.compiled and 0 < len(drafted) < k and q is None:  # one compiled chain length: pad with
                stats.padded += k - len(drafted)  # certain proposals, verified like the others
                drafted = drafted + drafted[-1:] * (k - len(drafted))
            logits = checker.logits(torch.tensor([[out[-1], *drafted]], device=device))  # (len + 1, vocab)
            if sampler.config.greedy:
                n, following = verify_greedy(logits, drafted)
            else:
                proposed = torch.tensor(drafted, dtype=torch.long, device=device)
                q = q if q is not None else F.one_hot(proposed, logits.shape[-1]).float()  # certain proposals
                n, following = verify(sampler.probs(logits), q, proposed, sampler)
            checker.state.rewind(len(drafted) - n)  # keep the pending token and the n accepted
            if proposal:
                gate.record(n > 0 if drafted else following == proposal[0])
                stats.skipped += not drafted
            out += [*drafted[:n], following]
            stats.rounds, stats.proposed, stats.accepted = stats.rounds + 1, stats.proposed + len(drafted), stats.accepted + n
            stats.accepted_per_round.append(n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.decode_seconds += time.perf_counter() - began
    out = out[:max_new_tokens]
    stats.generated += len(out)
    return torch.tensor([out], device=device)
