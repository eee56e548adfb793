"""2. Continuation (the protocol shared with benchmarks/kvpress_driver.py): prefill, compress, score the next tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from leanlm.data import tokenize_split
from leanlm.data.wikitext import check_split
from leanlm.errors import LeanLMError
from leanlm.evaluate.kv.common import (JOINS, PolicyArg, dtype_name, cache_nbytes, cache_peak_nbytes, cache_total_nbytes,
                                      forward_hidden,
                                      open_cache)
from leanlm.evaluate.kv.scoring import KVQualityResult, UncompressedReference, evaluate_windows, WindowRun, head_fingerprint
from leanlm.kvcache import CachePolicy


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
        return {"name": "continuation", **asdict(self), "dtype": dtype_name(model), "bos": False,
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
    def run(model, policy: CachePolicy | None, ids: torch.Tensor, bar) -> WindowRun:
        with open_cache(model, policy) as cache:
            prefill = forward_hidden(model, cache, ids[:context])  # (context, hidden): one forward, then compression
            nbytes, total = cache_nbytes(cache), cache_total_nbytes(cache)
            bar.update(context)
            scored = forward_hidden(model, cache, ids[context:])  # (continuation, hidden), teacher forced
            bar.update(len(ids) - context)
            peak = cache_peak_nbytes(cache)
        # The prefill's last state predicts continuation token 0; the last continuation state predicts past the window.
        hidden = torch.cat([prefill[-1:], scored[:-1]])  # (continuation, hidden)
        return WindowRun(hidden, ids[context:], nbytes, peak, total)

    return run


def continuation_perplexity(model, tokenizer, policy: PolicyArg = None, protocol: ContinuationProtocol | None = None,
                            reference: bool | UncompressedReference | None = None) -> KVQualityResult:
    """NLL of each window's continuation after a policy-compressed prefill, plus KL to the uncompressed run.

    ``bytes_per_token`` = resident cache bytes right after the prefill / context. ``reference`` as in
    ``streaming_perplexity`` (True, or ``continuation_reference(...)``'s result).
    """
    protocol = protocol or ContinuationProtocol()
    windows = [torch.tensor(w, dtype=torch.long) for w in continuation_windows(tokenizer, protocol)]
    result, _ = evaluate_windows(model, policy, windows, _continuation_window(protocol.context), "continuation",
                          protocol.record(model), protocol.context, reference)
    return result


def continuation_reference(model, tokenizer, protocol: ContinuationProtocol | None = None) -> UncompressedReference:
    """The uncompressed continuation run, kept to score many policies against (``reference=`` argument)."""
    protocol = protocol or ContinuationProtocol()
    windows = [torch.tensor(w, dtype=torch.long) for w in continuation_windows(tokenizer, protocol)]
    record = protocol.record(model)
    result, hidden = evaluate_windows(model, None, windows, _continuation_window(protocol.context), "continuation", record,
                               protocol.context, None, keep_hidden=True)
    return UncompressedReference("continuation", record, windows, hidden, result, head_fingerprint(model))
