"""KV-cache policies judged four ways: streaming perplexity, continuation, passkey, long generation.

Every protocol takes ``(model, tokenizer, policy, protocol)`` and returns a dataclass whose
``to_dict()`` records the protocol, the dtype and the policy. ``policy`` is one of:
- ``None``: uncompressed, a plain transformers ``DynamicCache``;
- a ``CachePolicy`` (``leanlm.kvcache.make_policy(...)``), attached afresh for every window/prompt;
- a factory ``tokens -> CachePolicy``, called with the number of tokens the cache is sized for
  (streaming and continuation: ``context``; passkey: each prompt's length; long generation: prompt +
  new tokens), so ``lambda n: make_policy("heavy_hitter", 0.25, n)`` means 25 % of *that* text.

Every forward passes explicit ``position_ids = cache.next_position_ids(n)``: an evicting cache holds
fewer tokens than the text has seen, so the positions cannot be inferred from its length.

Quality against the uncompressed cache (KL). Full-vocabulary log-probs are big (8192 tokens × 49152
× 4 bytes = 1.6 GB), so a reference stores the uncompressed run's *final hidden states* instead
(post-norm, model dtype: 8192 × 576 × 2 bytes = 9.4 MB for SmolLM2) and rebuilds the reference
log-probs exactly, slice by slice, with the output head (``lm_head``, as LlamaForCausalLM does).
The KL is exact over the whole vocabulary, the reference costs one uncompressed run, and it is
reused for any number of policies (``streaming_reference`` / ``continuation_reference``). Passing
``reference=True`` instead runs the uncompressed window just before the policy's, window by window,
keeping nothing. Policy and reference logits go through the same slicing, so a cache that changes
nothing gives KL exactly 0.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import Cache

from leanlm.data import nonoverlapping_windows, split_sentences, tokenize_split
from leanlm.data.wikitext import check_split, wikitext_text
from leanlm.errors import LeanLMError
from leanlm.evaluate.memory import cache_tensors
from leanlm.generate import next_positions
from leanlm.kvcache import CachePolicy, attach
from leanlm.models.compat import with_cache

PolicyArg = CachePolicy | Callable[[int], CachePolicy] | None
JOINS = ("raw", "paper")
SCORE_SLICE = 256  # positions per output-head slice: (256, vocab) float32 = 50 MB for SmolLM2


# ---------------------------------------------------------------------------------------------
# Shared machinery: policies, caches, forwards, scoring
# ---------------------------------------------------------------------------------------------


def resolve_policy(policy: PolicyArg, tokens: int) -> CachePolicy | None:
    """The policy to attach for a text of ``tokens`` tokens (a factory is called with it)."""
    if policy is None or isinstance(policy, CachePolicy):
        return policy
    if callable(policy):
        built = policy(tokens)
        if built is not None and not isinstance(built, CachePolicy):
            raise LeanLMError(f"a policy factory must return a CachePolicy, got {type(built).__name__}")
        return built
    raise LeanLMError(f"policy must be None, a CachePolicy or a factory tokens -> CachePolicy, got {type(policy).__name__}")


def describe_policy(policy: CachePolicy | None) -> dict:
    return {"policy": "none", "cache": "DynamicCache"} if policy is None else policy.describe()


@contextmanager
def open_cache(model, policy: CachePolicy | None) -> Iterator[Cache]:
    """A fresh cache: a plain DynamicCache for ``None``, else the policy's (hooks removed on exit)."""
    if policy is None:
        yield DynamicCache()
    else:
        with attach(model, policy) as cache:
            yield cache


def cache_nbytes(cache: Cache) -> int:
    """Resident bytes the cache holds now."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


def cache_peak_nbytes(cache: Cache) -> int:
    """Peak bytes incl. transient dequantized copies (a DynamicCache only grows: its peak is now)."""
    return cache.peak_nbytes() if hasattr(cache, "peak_nbytes") else cache_nbytes(cache)


def cache_held_tokens(cache: Cache) -> int:
    return cache.held_tokens() if hasattr(cache, "held_tokens") else cache.get_seq_length()


def forward_hidden(model, cache: Cache, ids: torch.Tensor) -> torch.Tensor:
    """Feed ``ids`` (1-D) through the cache; the final post-norm hidden states, (len(ids), hidden)."""
    device = next(model.parameters()).device
    ids = ids.to(device).unsqueeze(0)  # (1, n)
    out = model.model(input_ids=ids, **with_cache(cache), position_ids=next_positions(cache, ids.shape[1], device=device),
                      use_cache=True)
    return out.last_hidden_state[0]  # (n, hidden)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits from final hidden states (LlamaForCausalLM's head), (n, vocab) in model dtype."""
    return model.get_output_embeddings()(hidden)


@dataclass
class _Scores:
    """Running sums over scored positions."""

    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0

    def add(self, other: _Scores) -> None:
        self.nll, self.kl = self.nll + other.nll, self.kl + other.kl
        self.agree, self.count = self.agree + other.agree, self.count + other.count


def score_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, ref_hidden: torch.Tensor | None = None) -> _Scores:
    """NLL of ``targets`` and, against ``ref_hidden``, sum of KL(p_ref || p) and top-1 agreement.

    hidden, ref_hidden: (n, hidden_size); targets: (n,). Slices keep the float32 log-probs small.
    """
    scores = _Scores(count=len(targets))
    targets = targets.to(hidden.device)
    for start in range(0, len(targets), SCORE_SLICE):
        end = start + SCORE_SLICE
        logp = F.log_softmax(output_logits(model, hidden[start:end]).float(), dim=-1)  # (slice, vocab)
        scores.nll -= logp.gather(1, targets[start:end, None]).sum().item()
        if ref_hidden is not None:
            ref_logp = F.log_softmax(output_logits(model, ref_hidden[start:end]).float(), dim=-1)  # (slice, vocab)
            scores.kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()  # sum p_ref (log p_ref - log p)
            scores.agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
    return scores


@dataclass
class _WindowRun:
    hidden: torch.Tensor  # (scored, hidden_size): the states that predict `targets`
    targets: torch.Tensor  # (scored,)
    nbytes: int  # resident cache bytes at the protocol's measuring point
    peak: int


@dataclass
class KVQualityResult:
    """Quality and measured bytes of one policy under the streaming or the continuation protocol."""

    perplexity: float
    mean_nll: float
    tokens_scored: int
    kl: float | None  # mean KL(p_uncompressed || p_policy) per scored position, nats; None without a reference
    top1_agreement: float | None  # share of scored positions whose argmax matches the uncompressed run
    reference_perplexity: float | None  # the uncompressed run's perplexity on the same positions
    bytes_per_token: float  # mean over windows of resident cache bytes / tokens (see each protocol)
    reference_bytes_per_token: float | None
    peak_bytes: int  # max over windows of the cache's peak bytes (incl. transient dequantized copies)
    window_nll: list[float]  # mean NLL of each window, in order
    policy: dict
    protocol: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UncompressedReference:
    """The uncompressed run of a protocol, kept to score many policies against (see the module doc).

    ``hidden[i]`` holds window i's final hidden states at the scored positions, (scored, hidden_size),
    in the model dtype: the exact reference log-probs are ``log_softmax(lm_head(hidden[i]))``, rebuilt
    with the output head of the model being scored, so that head must be the reference model's
    (checked by ``head``). A model changed elsewhere (pruned layers, a new cache) may be scored
    against it: its KL is then to the original model.
    """

    kind: str  # "streaming" | "continuation"
    protocol: dict
    windows: list[torch.Tensor]  # each window's token ids, 1-D (checked against the policy run)
    hidden: list[torch.Tensor]
    result: KVQualityResult  # the uncompressed run itself (a baseline row for free)
    head: tuple  # fingerprint of the output head (shape, sum of a few rows)

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def head_fingerprint(model) -> tuple:
    weight = model.get_output_embeddings().weight.detach()  # (vocab, hidden)
    return tuple(weight.shape), float(weight[:64].float().sum())


def _check_reference(model, reference: UncompressedReference, kind: str, record: dict,
                     windows: list[torch.Tensor]) -> None:
    if reference.head != head_fingerprint(model):
        raise LeanLMError("the reference was computed with a model whose output head differs from this one")
    if reference.kind != kind or reference.protocol != record:
        raise LeanLMError(f"the reference was computed for another protocol ({reference.kind}: {reference.protocol}), "
                          f"not this one ({kind}: {record})")
    if len(reference.windows) != len(windows) or any(not torch.equal(a, b) for a, b in zip(reference.windows, windows)):
        raise LeanLMError("the reference was computed on other token ids (another tokenizer or text?)")


def _evaluate(model, policy: PolicyArg, windows: list[torch.Tensor], run_window, kind: str, record: dict,
              sized_for: int, reference, keep_hidden: bool = False) -> tuple[KVQualityResult, list[torch.Tensor]]:
    """Run ``run_window(model, policy, ids, bar)`` on every window, scoring it (and against a reference)."""
    if isinstance(reference, UncompressedReference):
        _check_reference(model, reference, kind, record, windows)
    elif reference not in (None, False, True):
        raise LeanLMError(f"reference must be None, True or an UncompressedReference, got {type(reference).__name__}")
    resolved = resolve_policy(policy, sized_for)
    on_the_fly = reference is True
    start = time.perf_counter()
    total, ref_total = _Scores(), _Scores()
    per_window, nbytes, ref_nbytes, peaks, kept = [], [], [], [], []
    passes = 2 if on_the_fly else 1
    bar = tqdm(total=passes * sum(len(w) for w in windows), desc=f"{kind} ({resolved.name if resolved else 'none'})",
               unit="tok", leave=False)
    with torch.inference_mode(), bar:
        for i, ids in enumerate(windows):
            ref_hidden = None
            if on_the_fly:
                ref = run_window(model, None, ids, bar)
                ref_hidden, ref_nbytes = ref.hidden, ref_nbytes + [ref.nbytes]
                ref_total.add(score_hidden(model, ref.hidden, ref.targets))
            elif reference is not None and reference is not False:
                ref_hidden = reference.hidden[i]
            run = run_window(model, resolved, ids, bar)
            scores = score_hidden(model, run.hidden, run.targets, ref_hidden)
            total.add(scores)
            per_window.append(scores.nll / scores.count)
            nbytes.append(run.nbytes)
            peaks.append(run.peak)
            if keep_hidden:
                kept.append(run.hidden)
    with_ref = reference is not None and reference is not False
    tokens = record["context"]  # bytes are per context token in both protocols
    if on_the_fly:
        ref_ppl, ref_bytes = math.exp(ref_total.nll / ref_total.count), sum(ref_nbytes) / len(ref_nbytes) / tokens
    elif with_ref:
        ref_ppl, ref_bytes = reference.result.perplexity, reference.result.bytes_per_token
    else:
        ref_ppl = ref_bytes = None
    result = KVQualityResult(
        perplexity=math.exp(total.nll / total.count),
        mean_nll=total.nll / total.count,
        tokens_scored=total.count,
        kl=total.kl / total.count if with_ref else None,
        top1_agreement=total.agree / total.count if with_ref else None,
        reference_perplexity=ref_ppl,
        bytes_per_token=sum(nbytes) / len(nbytes) / tokens,
        reference_bytes_per_token=ref_bytes,
        peak_bytes=max(peaks),
        window_nll=per_window,
        policy=describe_policy(resolved),
        protocol=record,
        seconds=time.perf_counter() - start,
    )
    return result, kept


def _dtype(model) -> str:
    return str(model.dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# 1. Streaming perplexity
# ---------------------------------------------------------------------------------------------


@dataclass
class StreamingProtocol:
    """Back-to-back windows of ``context`` tokens, each fed from an empty cache ``chunk`` tokens at a time."""

    split: str = field(default="test", metadata={"help": "WikiText-2 split"})
    context: int = field(default=2048, metadata={"help": "tokens per window (each starts from an empty cache)"})
    chunk: int = field(default=16, metadata={"help": "tokens per forward; 1 = exact token-by-token streaming"})
    max_tokens: int | None = field(default=8192, metadata={"help": "first N tokens of the split; None = all"})
    join: str = field(default="paper", metadata={"help": "rows joined with \\n\\n (paper) or the raw file (raw)"})

    def validate(self) -> None:
        check_split(self.split)
        if self.context < 2:
            raise LeanLMError(f"streaming context must be at least 2 tokens, got {self.context}")
        if not 1 <= self.chunk <= self.context:
            raise LeanLMError(f"streaming chunk must be between 1 and the context ({self.context}), got {self.chunk}")
        if self.max_tokens is not None and self.max_tokens < self.context:
            raise LeanLMError(f"max tokens ({self.max_tokens}) must hold at least one window of {self.context}")
        if self.join not in JOINS:
            raise LeanLMError(f"unknown join '{self.join}': choose one of {', '.join(JOINS)}")

    def record(self, model) -> dict:
        return {"name": "streaming", **asdict(self), "dtype": _dtype(model), "bos": False,
                "scored": "tokens 1..context-1 of each window"}


def streaming_windows(tokenizer, protocol: StreamingProtocol) -> list[torch.Tensor]:
    """The token ids (1-D) of each streaming window, in order."""
    protocol.validate()
    ids = tokenize_split(tokenizer, protocol.split, protocol.join)
    if protocol.max_tokens is not None:
        ids = ids[: protocol.max_tokens]
    return [ids[w.start : w.end] for w in nonoverlapping_windows(len(ids), protocol.context)]


def _stream_window(chunk: int):
    def run(model, policy: CachePolicy | None, ids: torch.Tensor, bar) -> _WindowRun:
        with open_cache(model, policy) as cache:
            states = []
            for piece in ids.split(chunk):
                states.append(forward_hidden(model, cache, piece))  # (chunk, hidden)
                bar.update(len(piece))
            nbytes, peak = cache_nbytes(cache), cache_peak_nbytes(cache)
        hidden = torch.cat(states)[:-1]  # (context - 1, hidden): the last state predicts past the window
        return _WindowRun(hidden, ids[1:], nbytes, peak)

    return run


def streaming_perplexity(model, tokenizer, policy: PolicyArg = None, protocol: StreamingProtocol | None = None,
                         reference: bool | UncompressedReference | None = None) -> KVQualityResult:
    """Perplexity of WikiText-2 streamed through a cache policy, plus KL to the uncompressed run.

    Each window starts from an empty cache and is fed ``chunk`` tokens at a time; tokens 1..context-1
    are scored (token 0 has nothing before it). ``bytes_per_token`` = resident cache bytes at the end
    of each window / context, averaged over windows. ``reference``: None (no KL), True (run the
    uncompressed window just before each policy window) or ``streaming_reference(...)``'s result.
    """
    protocol = protocol or StreamingProtocol()
    windows = streaming_windows(tokenizer, protocol)
    result, _ = _evaluate(model, policy, windows, _stream_window(protocol.chunk), "streaming", protocol.record(model),
                          protocol.context, reference)
    return result


def streaming_reference(model, tokenizer, protocol: StreamingProtocol | None = None) -> UncompressedReference:
    """The uncompressed streaming run, kept to score many policies against (``reference=`` argument)."""
    protocol = protocol or StreamingProtocol()
    windows = streaming_windows(tokenizer, protocol)
    record = protocol.record(model)
    result, hidden = _evaluate(model, None, windows, _stream_window(protocol.chunk), "streaming", record,
                               protocol.context, None, keep_hidden=True)
    return UncompressedReference("streaming", record, windows, hidden, result, head_fingerprint(model))


# ---------------------------------------------------------------------------------------------
# 2. Continuation (the protocol shared with benchmarks/kvpress_driver.py)
# ---------------------------------------------------------------------------------------------


@dataclass
class ContinuationProtocol:
    """Prefill ``context`` tokens in one forward, then score the next ``continuation`` tokens in one forward."""

    split: str = field(default="test", metadata={"help": "WikiText-2 split"})
    context: int = field(default=2048, metadata={"help": "tokens prefilled (and compressed) before the continuation"})
    continuation: int = field(default=128, metadata={"help": "tokens scored, teacher-forced in one forward"})
    windows: int = field(default=4, metadata={"help": "back-to-back windows of context + continuation tokens"})
    join: str = field(default="paper", metadata={"help": "rows joined with \\n\\n (paper) or the raw file (raw)"})

    def validate(self) -> None:
        check_split(self.split)
        if self.context < 1 or self.continuation < 1 or self.windows < 1:
            raise LeanLMError("continuation needs context, continuation and windows of at least 1, got "
                              f"{self.context}, {self.continuation}, {self.windows}")
        if self.join not in JOINS:
            raise LeanLMError(f"unknown join '{self.join}': choose one of {', '.join(JOINS)}")

    def record(self, model) -> dict:
        return {"name": "continuation", **asdict(self), "dtype": _dtype(model), "bos": False,
                "scored": "the continuation tokens; bytes measured right after the prefill"}


def continuation_windows(tokenizer, protocol: ContinuationProtocol | None = None) -> list[list[int]]:
    """The exact token windows (context + continuation ids each), back to back from the split's start."""
    protocol = protocol or ContinuationProtocol()
    protocol.validate()
    ids = tokenize_split(tokenizer, protocol.split, protocol.join)
    size = protocol.context + protocol.continuation
    if len(ids) < size * protocol.windows:
        raise LeanLMError(f"the '{protocol.split}' split has {len(ids)} tokens, fewer than {protocol.windows} "
                          f"windows of {size}")
    return [ids[i * size : (i + 1) * size].tolist() for i in range(protocol.windows)]


def _continuation_window(context: int):
    def run(model, policy: CachePolicy | None, ids: torch.Tensor, bar) -> _WindowRun:
        with open_cache(model, policy) as cache:
            prefill = forward_hidden(model, cache, ids[:context])  # (context, hidden): one forward, then compression
            nbytes = cache_nbytes(cache)
            bar.update(context)
            scored = forward_hidden(model, cache, ids[context:])  # (continuation, hidden), teacher forced
            bar.update(len(ids) - context)
            peak = cache_peak_nbytes(cache)
        # The prefill's last state predicts continuation token 0; the last continuation state predicts past the window.
        hidden = torch.cat([prefill[-1:], scored[:-1]])  # (continuation, hidden)
        return _WindowRun(hidden, ids[context:], nbytes, peak)

    return run


def continuation_perplexity(model, tokenizer, policy: PolicyArg = None, protocol: ContinuationProtocol | None = None,
                            reference: bool | UncompressedReference | None = None) -> KVQualityResult:
    """NLL of each window's continuation after a policy-compressed prefill, plus KL to the uncompressed run.

    ``bytes_per_token`` = resident cache bytes right after the prefill / context. ``reference`` as in
    ``streaming_perplexity`` (True, or ``continuation_reference(...)``'s result).
    """
    protocol = protocol or ContinuationProtocol()
    windows = [torch.tensor(w, dtype=torch.long) for w in continuation_windows(tokenizer, protocol)]
    result, _ = _evaluate(model, policy, windows, _continuation_window(protocol.context), "continuation",
                          protocol.record(model), protocol.context, reference)
    return result


def continuation_reference(model, tokenizer, protocol: ContinuationProtocol | None = None) -> UncompressedReference:
    """The uncompressed continuation run, kept to score many policies against (``reference=`` argument)."""
    protocol = protocol or ContinuationProtocol()
    windows = [torch.tensor(w, dtype=torch.long) for w in continuation_windows(tokenizer, protocol)]
    record = protocol.record(model)
    result, hidden = _evaluate(model, None, windows, _continuation_window(protocol.context), "continuation", record,
                               protocol.context, None, keep_hidden=True)
    return UncompressedReference("continuation", record, windows, hidden, result, head_fingerprint(model))


# ---------------------------------------------------------------------------------------------
# 3. Passkey retrieval
# ---------------------------------------------------------------------------------------------

PASSKEY_INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.\n")
PASSKEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyProtocol:
    """Prompts of ``lengths`` tokens of WikiText-2 test filler with a 5-digit key at each of ``depths``."""

    lengths: tuple[int, ...] = field(default=(2048, 4096, 8192), metadata={"help": "prompt lengths in tokens"})
    depths: tuple[float, ...] = field(default=(0.1, 0.5, 0.9), metadata={"help": "where the key sits in the filler (0..1)"})
    seed: int = field(default=0, metadata={"help": "seeds the random keys"})
    prefill_chunk: int = field(default=512, metadata={"help": "prompt tokens per prefill forward (bounds attention memory)"})

    def validate(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise LeanLMError(f"passkey lengths must be positive token counts, got {self.lengths}")
        if not self.depths or not all(0 <= d <= 1 for d in self.depths):
            raise LeanLMError(f"passkey depths must lie in [0, 1], got {self.depths}")
        if self.prefill_chunk < 1:
            raise LeanLMError(f"passkey prefill chunk must be positive, got {self.prefill_chunk}")


@dataclass
class PasskeyItem:
    ids: list[int]  # the whole prompt, ending with the question
    answer_ids: list[int]  # the tokens that continue the prompt with the key
    length: int  # requested prompt length (len(ids) equals it)
    depth: float
    passkey: str
    key_start: int  # index in `ids` where the key sentence begins


def _filler_sentences(tokenizer, tokens_needed: int) -> list[list[int]]:
    """Token ids of WikiText-2 test sentences from the start of the file, at least ``tokens_needed`` in all."""
    sentences = split_sentences(wikitext_text("test", "raw"))
    pieces, total, batch = [], 0, 256
    for start in range(0, len(sentences), batch):
        for ids in tokenizer(sentences[start : start + batch], add_special_tokens=False)["input_ids"]:
            pieces.append(list(ids))
            total += len(ids)
        if total >= tokens_needed:
            return pieces
    raise LeanLMError(f"WikiText-2 test has {total} tokens, fewer than the {tokens_needed} filler tokens asked for")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answer_ids(tokenizer, key: str) -> list[int]:
    """The key's tokens as they continue the question (tokenized together, so merges match)."""
    question = _encode(tokenizer, PASSKEY_QUESTION)
    both = _encode(tokenizer, PASSKEY_QUESTION + " " + key)
    if both[: len(question)] == question and len(both) > len(question):
        return both[len(question) :]
    return _encode(tokenizer, " " + key)


def passkey_prompts(tokenizer, protocol: PasskeyProtocol | None = None) -> list[PasskeyItem]:
    """One prompt per (length, depth): intro, filler with the key sentence, question; exactly ``length`` tokens.

    The filler is the start of WikiText-2 test (the same contiguous text for every item, cut at the
    length). The key sentence goes in at the sentence boundary nearest ``depth`` × the filler. Keys are
    random 5-digit numbers drawn in item order from ``random.Random(seed)``.
    """
    protocol = protocol or PasskeyProtocol()
    protocol.validate()
    rng = random.Random(protocol.seed)
    intro, question = _encode(tokenizer, PASSKEY_INTRO), _encode(tokenizer, PASSKEY_QUESTION)
    sentences = _filler_sentences(tokenizer, max(protocol.lengths))
    filler = [t for s in sentences for t in s]
    ends = [0]  # sentence boundaries, as token offsets into `filler`
    for s in sentences:
        ends.append(ends[-1] + len(s))
    items = []
    for length in protocol.lengths:
        for depth in protocol.depths:
            key = str(rng.randint(10000, 99999))
            key_ids = _encode(tokenizer, PASSKEY_SENTENCE.format(key=key))
            budget = length - len(intro) - len(key_ids) - len(question)  # filler tokens
            if budget < 1:
                raise LeanLMError(f"a passkey prompt of {length} tokens has no room for filler: use at least "
                                  f"{length - budget + 1} tokens")
            boundaries = [e for e in ends if e <= budget] + [budget]
            insert = min(boundaries, key=lambda e: abs(e - depth * budget))
            ids = intro + filler[:insert] + key_ids + filler[insert:budget] + question
            items.append(PasskeyItem(ids, _answer_ids(tokenizer, key), length, depth, key, len(intro) + insert))
    return items


@dataclass
class PasskeyResult:
    accuracy: dict[str, float]  # key: prompt length; exact match of the greedy answer
    answer_loglik: dict[str, float]  # key: prompt length; mean total log-likelihood of the answer tokens (nats)
    items: list[dict]  # per item: length, depth, passkey, correct, loglik, predicted, cache bytes
    policy: dict[str, dict]  # key: prompt length; the policy attached for that length
    protocol: dict
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def passkey_eval(model, tokenizer, policy: PolicyArg, items: list[PasskeyItem],
                 protocol: PasskeyProtocol | None = None) -> PasskeyResult:
    """Greedy exact match and answer log-likelihood of each passkey prompt under ``policy``.

    Each prompt is prefilled through the policy in chunks of ``protocol.prefill_chunk`` tokens, so an
    evicting policy already evicts during the prefill (as a real long prompt would need). A factory
    policy is called with each prompt's length.
    """
    protocol = protocol or PasskeyProtocol()
    protocol.validate()
    start = time.perf_counter()
    details, policies = [], {}
    bar = tqdm(total=sum(len(it.ids) + len(it.answer_ids) for it in items), desc="passkey", unit="tok", leave=False)
    with torch.inference_mode(), bar:
        for item in items:
            resolved = resolve_policy(policy, item.length)
            policies[str(item.length)] = describe_policy(resolved)
            with open_cache(model, resolved) as cache:
                for piece in torch.tensor(item.ids).split(protocol.prefill_chunk):
                    hidden = forward_hidden(model, cache, piece)  # (piece, hidden)
                    bar.update(len(piece))
                nbytes, held = cache_nbytes(cache), cache_held_tokens(cache)
                # One pass gives both numbers. The answer is teacher-forced one token per forward, exactly
                # as greedy decoding would feed it: while every argmax so far equals the answer, greedy's
                # inputs *are* the answer tokens, so its next argmax is the one computed here; at the first
                # mismatch both verdicts are "wrong". Hence greedy exact match == all argmaxes equal the
                # answer. One token per forward (not the answer in one forward) keeps the cache dynamics of
                # real decoding: an evicting policy evicts after every token, a quantizing one flushes its
                # residual when it fills.
                logits = output_logits(model, hidden[-1:])[0]  # (vocab,) predicts answer token 0
                loglik, predicted = 0.0, []
                for i, target in enumerate(item.answer_ids):
                    logp = F.log_softmax(logits.float(), dim=-1)
                    loglik += logp[target].item()
                    predicted.append(int(logp.argmax()))
                    if i + 1 < len(item.answer_ids):
                        logits = output_logits(model, forward_hidden(model, cache, torch.tensor([target])))[0]
                    bar.update(1)
            details.append({
                "length": item.length, "depth": item.depth, "passkey": item.passkey,
                "correct": predicted == item.answer_ids, "loglik": loglik,
                # argmax at each teacher-forced step: the greedy output up to and including its first error
                "predicted": tokenizer.decode(predicted), "cache_bytes": nbytes, "held_tokens": held,
            })
    lengths = sorted({d["length"] for d in details})
    accuracy = {str(n): _mean([d["correct"] for d in details if d["length"] == n]) for n in lengths}
    loglik = {str(n): _mean([d["loglik"] for d in details if d["length"] == n]) for n in lengths}
    record = {"name": "passkey", **asdict(protocol), "items": len(items), "item_lengths": lengths,
              "item_depths": sorted({d["depth"] for d in details}), "dtype": _dtype(model), "bos": False,
              "filler": "WikiText-2 test from its start", "decoding": "greedy (exact match via stepwise teacher forcing)"}
    return PasskeyResult(accuracy, loglik, details, policies, record, time.perf_counter() - start)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def normalise(result: PasskeyResult | dict, baseline: PasskeyResult | dict) -> dict[str, dict]:
    """A passkey result relative to a baseline (e.g. the uncompressed cache), laid out like the result.

    ``{"accuracy": {length: accuracy / baseline accuracy, None where the baseline scores 0},
    "answer_loglik": {length: answer log-likelihood - the baseline's (nats; < 0 is worse)}}``.
    Takes results or their ``to_dict()`` (e.g. read back from JSON).
    """
    res = result.to_dict() if isinstance(result, PasskeyResult) else result
    base = baseline.to_dict() if isinstance(baseline, PasskeyResult) else baseline
    accuracy, loglik = {}, {}
    for length, acc in res["accuracy"].items():
        if length not in base["accuracy"]:
            raise LeanLMError(f"the baseline has no passkey result for length {length}")
        base_acc = base["accuracy"][length]
        accuracy[length] = acc / base_acc if base_acc > 0 else None
        loglik[length] = res["answer_loglik"][length] - base["answer_loglik"][length]
    return {"accuracy": accuracy, "answer_loglik": loglik}


# ---------------------------------------------------------------------------------------------
# 4. Long generation
# ---------------------------------------------------------------------------------------------

DEFAULT_PROMPT = ("Chapter 1\n\nThe old lighthouse keeper had not spoken to anyone for three winters. "
                  "On the morning the supply boat failed to arrive, he")


@dataclass
class LongGenerationProtocol:
    """Decode ``new_tokens`` tokens one at a time, sampling cache bytes, RSS and time as it goes.

    Past the model's trained length (8192 for SmolLM2) only a policy that keeps positions inside it
    stays sane: pass ``SinkWindow(..., position_mode="cache")``. The loop never stops early (an
    end-of-text token is just another token) and keeps nothing that grows with the tokens.
    """

    new_tokens: int = field(default=16384, metadata={"help": "tokens to generate"})
    sample_every: int = field(default=256, metadata={"help": "record bytes, RSS and time every N tokens"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "text the generation continues"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature; 0 = greedy"})
    top_k: int = field(default=50, metadata={"help": "sample among the k likeliest tokens; 0 = all"})
    seed: int = field(default=0, metadata={"help": "seeds the sampler"})
    prefill_chunk: int = field(default=512, metadata={"help": "prompt tokens per prefill forward"})

    def validate(self) -> None:
        if self.new_tokens < 1 or self.sample_every < 1 or self.prefill_chunk < 1:
            raise LeanLMError("long generation needs new_tokens, sample_every and prefill_chunk of at least 1")
        if self.temperature < 0 or self.top_k < 0:
            raise LeanLMError(f"temperature and top_k must be >= 0, got {self.temperature}, {self.top_k}")
        if not self.prompt:
            raise LeanLMError("long generation needs a non-empty prompt")


@dataclass
class LongGenerationResult:
    steps: list[int]  # tokens generated at each sample
    cache_bytes: list[int]  # resident cache bytes at each sample
    held_tokens: list[int]
    rss_mib: list[float]  # process resident set size at each sample
    seconds: list[float]  # decode time since the first generated token
    tokens_per_s: float  # generated tokens / decode seconds (prefill excluded)
    prompt_tokens: int
    text_head: str  # the first and last 64 generated tokens, to eyeball degeneration
    text_tail: str
    policy: dict
    protocol: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """logits (vocab,) → a token id: argmax at temperature 0, else top-k sampling at the temperature."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        values, indices = logits.topk(min(top_k, logits.shape[-1]))  # (k,)
        choice = torch.multinomial(values.softmax(-1), 1, generator=generator)
        return int(indices[choice])
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def long_generation(model, tokenizer, policy: PolicyArg = None,
                    protocol: LongGenerationProtocol | None = None) -> LongGenerationResult:
    """Generate ``protocol.new_tokens`` tokens through ``policy``, recording memory every ``sample_every``."""
    protocol = protocol or LongGenerationProtocol()
    protocol.validate()
    prompt = torch.tensor(_encode(tokenizer, protocol.prompt), dtype=torch.long)
    resolved = resolve_policy(policy, len(prompt) + protocol.new_tokens)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(protocol.seed)
    steps, nbytes, held, rss, seconds = [], [], [], [], []
    head, tail = [], deque(maxlen=64)
    with torch.inference_mode(), open_cache(model, resolved) as cache:
        for piece in prompt.split(protocol.prefill_chunk):
            hidden = forward_hidden(model, cache, piece)  # (piece, hidden)
        logits = output_logits(model, hidden[-1:])[0]  # (vocab,)
        start = time.perf_counter()
        bar = tqdm(range(1, protocol.new_tokens + 1), desc=f"generate ({resolved.name if resolved else 'none'})",
                   unit="tok", leave=False)
        for step in bar:
            token = _next_token(logits, protocol.temperature, protocol.top_k, generator)
            if len(head) < 64:
                head.append(token)
            tail.append(token)
            logits = output_logits(model, forward_hidden(model, cache, torch.tensor([token])))[0]
            if step % protocol.sample_every == 0 or step == protocol.new_tokens:
                steps.append(step)
                nbytes.append(cache_nbytes(cache))
                held.append(cache_held_tokens(cache))
                rss.append(_rss_mib())
                seconds.append(time.perf_counter() - start)
    record = {"name": "long_generation", **asdict(protocol), "dtype": _dtype(model), "bos": False}
    return LongGenerationResult(
        steps=steps, cache_bytes=nbytes, held_tokens=held, rss_mib=rss, seconds=seconds,
        tokens_per_s=protocol.new_tokens / seconds[-1], prompt_tokens=len(prompt),
        text_head=tokenizer.decode(head), text_tail=tokenizer.decode(list(tail)),
        policy=describe_policy(resolved), protocol=record,
    )


def plot_long_generation(result: LongGenerationResult | dict, path: str | Path) -> None:
    """Cache MiB and process RSS MiB against generated tokens (one result, two stacked panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = result.to_dict() if isinstance(result, LongGenerationResult) else result
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(data["steps"], [b / 2**20 for b in data["cache_bytes"]], marker=".", linewidth=1)
    top.set_ylabel("KV cache (MiB)")
    bottom.plot(data["steps"], data["rss_mib"], marker=".", linewidth=1, color="tab:orange")
    bottom.set_ylabel("process RSS (MiB)")
    bottom.set_xlabel("generated tokens")
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)  # a flat cache should look flat, not zoomed into noise
        ax.grid(alpha=0.3)
    top.set_title(f"long generation, policy {data['policy'].get('policy')}: {data['tokens_per_s']:.1f} tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = [
    "ContinuationProtocol", "KVQualityResult", "LongGenerationProtocol", "LongGenerationResult", "PasskeyItem",
    "PasskeyProtocol", "PasskeyResult", "StreamingProtocol", "UncompressedReference", "continuation_perplexity",
    "continuation_reference", "continuation_windows", "long_generation", "normalise", "passkey_eval",
    "passkey_prompts", "plot_long_generation", "resolve_policy", "streaming_perplexity", "streaming_reference",
    "streaming_windows",
]
