"""1. Streaming perplexity: back-to-back windows, each fed from an empty cache a chunk at a time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from leanlm.data import nonoverlapping_windows, tokenize_split
from leanlm.data.wikitext import check_split
from leanlm.errors import LeanLMError
from leanlm.evaluate.kv.common import (JOINS, PolicyArg, dtype_name, cache_nbytes, cache_peak_nbytes, cache_total_nbytes,
                                      forward_hidden,
                                      open_cache)
from leanlm.evaluate.kv.scoring import KVQualityResult, UncompressedReference, evaluate_windows, WindowRun, head_fingerprint
from leanlm.kvcache import CachePolicy


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
        return {"name": "streaming", **asdict(self), "dtype": dtype_name(model), "bos": False,
                "scored": "tokens 1..context-1 of each window"}


def streaming_windows(tokenizer, protocol: StreamingProtocol) -> list[torch.Tensor]:
    """The token ids (1-D) of each streaming window, in order."""
    protocol.validate()
    ids = tokenize_split(tokenizer, protocol.split, protocol.join)
    if protocol.max_tokens is not None:
        ids = ids[: protocol.max_tokens]
    return [ids[w.start : w.end] for w in nonoverlapping_windows(len(ids), protocol.context)]


def _stream_window(chunk: int):
    def run(model, policy: CachePolicy | None, ids: torch.Tensor, bar) -> WindowRun:
        with open_cache(model, policy) as cache:
            states = []
            for piece in ids.split(chunk):
                states.append(forward_hidden(model, cache, piece))  # (chunk, hidden)
                bar.update(len(piece))
            nbytes, peak, total = cache_nbytes(cache), cache_peak_nbytes(cache), cache_total_nbytes(cache)
        hidden = torch.cat(states)[:-1]  # (context - 1, hidden): the last state predicts past the window
        return WindowRun(hidden, ids[1:], nbytes, peak, total)

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
    result, _ = evaluate_windows(model, policy, windows, _stream_window(protocol.chunk), "streaming", protocol.record(model),
                          protocol.context, reference)
    return result


def streaming_reference(model, tokenizer, protocol: StreamingProtocol | None = None) -> UncompressedReference:
    """The uncompressed streaming run, kept to score many policies against (``reference=`` argument)."""
    protocol = protocol or StreamingProtocol()
    windows = streaming_windows(tokenizer, protocol)
    record = protocol.record(model)
    result, hidden = evaluate_windows(model, None, windows, _stream_window(protocol.chunk), "streaming", record,
                               protocol.context, None, keep_hidden=True)
    return UncompressedReference("streaming", record, windows, hidden, result, head_fingerprint(model))
