"""What proposes tokens for speculative decoding: a draft model, or the text itself (n-gram lookup).

A drafter sees the committed tokens (prompt and output so far, all final) and proposes up to k next
tokens, with the distributions they were drawn from ((k, vocab); None: each token was certain):

- ``ModelDrafter``: a smaller model with the target's tokenizer decodes k tokens through its own cache
  (the engine's lean step over a static cache where it runs, compiled or not). Its cache follows the
  committed text: the draft tokens the target rejected are rewound, committed tokens it has not seen
  are fed first.
- ``NgramDrafter`` (prompt lookup decoding, after transformers' ``prompt_lookup_num_tokens`` and vLLM's
  ``ngram`` speculator, which copy one matched occurrence's continuation): the token that followed the most
  recent earlier occurrence of the text's last n tokens (n from ``max_n`` down to ``min_n``), again and
  again on the growing proposal. No model and no cost per token; it proposes nothing where the text
  has no earlier match. Text that repeats itself (quotes, lists, code, and the loops a small model's
  greedy output falls into) is where it is accepted.

``make_drafter`` takes a model, a ``Drafter``, or the name ``"ngram"``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from leanlm.engine.decode import DecodeState, forward, prefill
from leanlm.engine.lean_step import lean_step, runs_lean
from leanlm.engine.sampling import Sampler
from leanlm.engine.static_cache import static_cache
from leanlm.engine.streaming_linear import enable_streaming_linears
from leanlm.errors import LeanLMError


class Drafter:
    """Proposes the next tokens of a text for the target to verify."""

    name = "drafter"
    free = False  # proposing costs nothing next to a target step (the n-gram lookup): see ProposalGate

    def start(self, capacity: int) -> None:
        """A new text begins (``capacity``: the most tokens it will reach, proposals included)."""

    def propose(self, committed: list[int], k: int, sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        raise NotImplementedError


class NgramDrafter(Drafter):
    """Prompt lookup: continue the text as it continued after the last earlier occurrence of its tail."""

    name = "ngram"
    free = True

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise LeanLMError(f"n-gram drafting needs 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.max_n, self.min_n = max_n, min_n
        self.start(0)

    def start(self, capacity: int) -> None:
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> the token after its latest occurrence
        self.indexed = 0  # committed tokens whose follower is recorded

    def _index(self, committed: list[int]) -> None:
        for end in range(max(self.indexed, 1), len(committed)):  # committed[end] follows the n-grams ending before it
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self.follower[tuple(committed[end - n:end])] = committed[end]
        self.indexed = len(committed)

    def next_token(self, text: list[int]) -> int | None:
        for n in range(min(self.max_n, len(text)), self.min_n - 1, -1):  # the longest matching tail wins
            token = self.follower.get(tuple(text[-n:]))
            if token is not None:
                return token
        return None

    def propose(self, committed: list[int], k: int, sampler: Sampler) -> tuple[list[int], None]:
        if len(committed) < self.indexed:
            raise LeanLMError("the n-gram drafter saw a longer text: call start() for a new one")
        self._index(committed)
        text, proposed = committed[-self.max_n:], []
        for _ in range(k):
            token = self.next_token(text)
            if token is None:
                break
            proposed.append(token)
            text = text[1:] + [token] if len(text) >= self.max_n else text + [token]
        return proposed, None


class ModelDrafter(Drafter):
    """A draft model decoding through its own cache, kept in step with the committed text."""

    name = "model"

    def __init__(self, model: nn.Module, compile: bool = False, prefill_chunk: int = 512):
        self.model, self.compile, self.prefill_chunk = model, compile, prefill_chunk
        self.vocab_size = model.config.vocab_size
        enable_streaming_linears(model)
        self.start(0)

    def start(self, capacity: int) -> None:
        device = next(self.model.parameters()).device
        lean = capacity > 0 and runs_lean(self.model)
        cache = static_cache(self.model, capacity) if lean else DynamicCache()
        self.state = DecodeState(cache, torch.zeros(1, dtype=torch.long, device=device), None)
        self.step = lean_step(self.model, cache, self.compile) if lean else None
        self.cached: list[int] = []  # the tokens in the draft's cache, in order
        self.device = device

    def _logits(self, ids: list[int]) -> torch.Tensor:
        """Feed ``ids`` (not yet cached) → (1, vocab) logits after the last one."""
        if len(ids) > 1:
            prefill(self.model, torch.tensor([ids[:-1]], device=self.device), self.state, self.prefill_chunk)
        last = torch.tensor([ids[-1:]], device=self.device)  # (1, 1)
        self.cached += ids
        if self.step is not None:
            return self.step(last, self.state)
        return forward(self.model, last, self.state)[:, -1]

    def propose(self, committed: list[int], k: int, sampler: Sampler) -> tuple[list[int], torch.Tensor | None]:
        common = 0
        limit = min(len(self.cached), len(committed) - 1)  # the last committed token is fed again for its logits
        while common < limit and self.cached[common] == committed[common]:
            common += 1
        self.state.rewind(len(self.cached) - common)
        del self.cached[common:]
        with torch.inference_mode():
            logits = self._logits(committed[common:])
            tokens, probs = [], []
            for index in range(k):
                if sampler.config.greedy:  # certain tokens: no distribution needed
                    tokens.append(int(logits.argmax(-1)))
                else:
                    probs.append(sampler.probs(logits))  # (1, vocab)
                    tokens.append(int(sampler.draw(probs[-1])))
                if index + 1 < k:  # the last draft token is fed next round, if the target keeps it
                    logits = self._logits(tokens[-1:])
        return tokens, torch.cat(probs) if probs else None


def make_drafter(draft, compile: bool = False) -> Drafter:
    """A ``Drafter`` from a model, a drafter, or the name ``"ngram"``."""
    if isinstance(draft, Drafter):
        return draft
    if isinstance(draft, nn.Module):
        return ModelDrafter(draft, compile)
    if draft == "ngram":
        return NgramDrafter()
    raise LeanLMError(f"a draft is a model, a Drafter or 'ngram', got {draft!r}")
