"""The one decode loop: chunked prefill, then one token per sequence per step, through any cache.

    tokens = generate(model, prompt_ids, max_new_tokens=64)                       # DynamicCache
    tokens = generate(model, ids, 64, cache=static_cache(model, ids.shape[1] + 64), compile=True)
    with attach(model, make_policy("quantized", 0.25, 4096)) as cache:            # a leanlm policy
        tokens = generate(model, ids, 64, cache=cache)

Batches of different lengths are left-padded (``left_pad``) and carry an ``attention_mask``; each
sequence's positions count only its own tokens. Policy caches decide positions themselves
(``next_position_ids``: eviction may renumber the cache) and take unpadded batches only.
Plain bf16 linear layers on the CPU decode through ``StreamingLinear`` (engine/kernels), and a
Llama-family model over a static cache decodes through ``LeanStep`` (engine/lean_step.py).
Only the last position's logits are computed (``logits_to_keep=1``): the 49K-wide output head runs
once per sequence per step, not once per prompt token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from leanlm.engine.compile import compiled_step
from leanlm.engine.lean_step import lean_step, runs_lean
from leanlm.engine.sampling import Sampler, SamplingConfig
from leanlm.engine.static_cache import capacity, is_static, static_cache
from leanlm.engine.streaming_linear import enable_streaming_linears
from leanlm.errors import LeanLMError
from leanlm.models.compat import with_cache

log = logging.getLogger(__name__)


def model_context(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 0) or 2**31


def left_pad(sequences: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths → (batch, longest) left-padded ids and their 0/1 attention mask."""
    if not sequences or min(len(s) for s in sequences) < 1:
        raise LeanLMError("every prompt needs at least one token")
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq):] = torch.tensor(seq)
        mask[row, longest - len(seq):] = 1
    return ids.to(device), mask.to(device)


@dataclass
class DecodeState:
    """What the loop tracks between steps besides the cache."""

    cache: object
    positions: torch.Tensor  # (batch,) position of the next token of each sequence
    mask: torch.Tensor | None  # (batch, kv slots) 1 = real token; None = no padding anywhere
    seen: int = 0  # tokens written to the cache per sequence (pads included)

    @property
    def policy(self) -> bool:
        return hasattr(self.cache, "next_position_ids")

    def position_ids(self, num_tokens: int) -> torch.Tensor:
        """(batch, num_tokens) positions of the next tokens."""
        batch = self.positions.shape[0]
        if self.policy:
            return self.cache.next_position_ids(num_tokens, batch=batch, device=self.positions.device)
        steps = torch.arange(num_tokens, device=self.positions.device)
        return self.positions[:, None] + steps  # (batch, num_tokens)

    def step_mask(self, num_tokens: int) -> torch.Tensor | None:
        """The 2-D mask for a forward of ``num_tokens`` new tokens (static cache: all its slots)."""
        if self.mask is None:
            return None
        if is_static(self.cache):
            return self.mask
        return self.mask[:, : self.seen + num_tokens]

    def advance(self, num_tokens: int) -> None:
        self.positions = self.positions + num_tokens
        self.seen += num_tokens

    def rewind(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` tokens of every sequence (speculative decoding's rejected ones),
        through transformers' ``Cache.crop``: a static cache only moves its count back (later writes
        overwrite the slots, attention stops at the count), a DynamicCache drops them; policy caches and
        sliding-window rings cannot go back."""
        if num_tokens <= 0:
            return
        if num_tokens > self.seen:
            raise LeanLMError(f"cannot forget {num_tokens} tokens of a cache holding {self.seen}")
        if self.policy or not getattr(self.cache, "is_croppable", False):
            raise LeanLMError(f"a {type(self.cache).__name__} cannot drop tokens it has stored")
        self.cache.crop(-num_tokens)
        self.positions = self.positions - num_tokens
        self.seen -= num_tokens


def start_state(model, prompt_ids: torch.Tensor, attention_mask, cache, total: int) -> DecodeState:
    """Check the request and build the state before the prompt is prefilled."""
    batch, length = prompt_ids.shape
    device = prompt_ids.device
    if length < 1:
        raise LeanLMError("the prompt is empty: give at least one token")
    if length > model_context(model):
        raise LeanLMError(f"the prompt has {length} tokens, longer than the model's context of {model_context(model)}")
    room = capacity(cache)
    if room is not None and total > room:
        raise LeanLMError(f"the static cache holds {room} tokens but prompt + new tokens need {total}")
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded and hasattr(cache, "next_position_ids"):
        raise LeanLMError("a KV-cache policy decodes equal-length prompts only; use the full or static cache for padded batches")
    mask = None
    positions = torch.zeros(batch, dtype=torch.long, device=device)
    if padded:
        mask = torch.ones(batch, room or total, dtype=torch.long, device=device)  # (batch, slots)
        mask[:, :length] = attention_mask.to(device)
        positions = -(length - attention_mask.to(device).sum(-1))  # pads take positions < 0 (masked anyway)
    return DecodeState(cache, positions, mask)


def forward(model, ids: torch.Tensor, state: DecodeState, keep: int = 1) -> torch.Tensor:
    """One eager forward of ``ids`` (batch, q) through the cache → (batch, keep or q, vocab) logits."""
    position_ids = state.position_ids(ids.shape[1]).clamp(min=0)
    out = model(ids, **with_cache(state.cache), position_ids=position_ids, attention_mask=state.step_mask(ids.shape[1]),
                use_cache=True, logits_to_keep=keep)
    state.advance(ids.shape[1])
    return out.logits


def prefill(model, prompt_ids: torch.Tensor, state: DecodeState, chunk: int = 512) -> torch.Tensor:
    """Run the prompt through the cache in chunks → (batch, vocab) logits of its last position."""
    if chunk < 1:
        raise LeanLMError(f"prefill chunk must be >= 1, got {chunk}")
    for part in prompt_ids.split(chunk, dim=1):
        logits = forward(model, part, state)
    return logits[:, -1]


def stream(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, cache=None,
           sampling: SamplingConfig | Sampler | None = None, attention_mask: torch.Tensor | None = None,
           prefill_chunk: int = 512, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield (batch,) next-token ids, one step at a time. ``cache`` None: a static cache sized to the
    prompt and new tokens for models the lean step runs, a DynamicCache for the others.

    ``compile=True`` runs each decode step through ``torch.compile`` when the cache allows it (a
    static cache); otherwise, or when compilation fails, it logs why and decodes eagerly.
    """
    if max_new_tokens < 0:
        raise LeanLMError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampler = sampling if isinstance(sampling, Sampler) else Sampler(sampling)
    if cache is None:  # a static cache where the lean step runs (it decodes faster), else a DynamicCache
        cache = static_cache(model, prompt_ids.shape[1] + max_new_tokens) if runs_lean(model) else DynamicCache()
    enable_streaming_linears(model)  # bf16 CPU weights: decode steps stream them through leanlm's kernel
    state = start_state(model, prompt_ids, attention_mask, cache, prompt_ids.shape[1] + max_new_tokens)
    step = lean_step(model, cache, compile) or (compiled_step(model, cache) if compile else None)
    # inference_mode wraps each computation, never a ``yield``: grad mode is thread-global, and a generator
    # suspended (or closed late) inside the context would leave the caller in inference mode.
    with torch.inference_mode():
        logits = prefill(model, prompt_ids, state, prefill_chunk)
    for index in range(max_new_tokens):
        with torch.inference_mode():
            token = sampler.sample(logits)  # (batch,)
        yield token
        if index + 1 == max_new_tokens:
            break
        with torch.inference_mode():
            logits = step(token[:, None], state) if step is not None else forward(model, token[:, None], state)[:, -1]
            if logits is None:  # compilation failed: the step said why, decode eagerly from here
                step, logits = None, forward(model, token[:, None], state)[:, -1]


def generate(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, cache=None,
             sampling: SamplingConfig | Sampler | None = None, attention_mask: torch.Tensor | None = None,
             prefill_chunk: int = 512, compile: bool = False, eos_token_id: int | None = None) -> torch.Tensor:
    """(batch, new) generated ids; with ``eos_token_id`` it stops once every sequence has produced it
    (later tokens of finished sequences are set to it)."""
    tokens, done = [], None
    for token in stream(model, prompt_ids, max_new_tokens, cache, sampling, attention_mask, prefill_chunk, compile):
        if eos_token_id is not None:
            token = token if done is None else torch.where(done, eos_token_id, token)
            done = token == eos_token_id if done is None else done | (token == eos_token_id)
        tokens.append(token)
        if done is not None and bool(done.all()):
            break
    if not tokens:
        return prompt_ids.new_zeros((prompt_ids.shape[0], 0))
    return torch.stack(tokens, dim=1)  # (batch, new)
