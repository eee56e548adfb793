"""Segmentation: the sentence of every token (pure ``segment``) and the ``Segmenter`` a cache's layers share."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from leanlm.errors import LeanLMError

SINK = -1  # the "sentence" of the attention-sink tokens


class SegmentState(NamedTuple):
    sentence: int = 0  # the sentence the next token joins (= sentences closed so far)
    length: int = 0  # tokens already in it


_BOUNDARY_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → table (decoding is slow)


def boundary_token_ids(tokenizer) -> torch.Tensor:
    """(vocab,) bool: the tokens whose decoded text ends a sentence (., !, ? or a newline)."""
    if tokenizer in _BOUNDARY_TABLES:
        return _BOUNDARY_TABLES[tokenizer]
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    table = torch.tensor([text.rstrip(" ").endswith((".", "!", "?", "\n")) for text in texts])
    _BOUNDARY_TABLES[tokenizer] = table
    return table


def segment(ids, is_boundary: torch.Tensor | None, max_len: int,
            state: SegmentState = SegmentState()) -> tuple[list[int], SegmentState]:
    """The sentence index of every token of ``ids``, continuing from ``state``; and the state after.

    ``ids``: (tokens,) or (batch, tokens) token ids (a boundary in any row counts). A sentence closes
    after a boundary token (``is_boundary[id]``; None: no boundary tokens) or at ``max_len`` tokens.
    """
    ids = torch.as_tensor(ids)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids  # (batch, tokens)
    ends = torch.zeros(ids.shape[1], dtype=torch.bool)
    if is_boundary is not None and ids.numel():
        if int(ids.max()) >= len(is_boundary) or int(ids.min()) < 0:
            raise LeanLMError(f"token ids must lie in the sentence-boundary table (0..{len(is_boundary) - 1}), "
                              f"got {int(ids.min())}..{int(ids.max())}")
        ends = is_boundary.cpu()[ids.cpu()].any(dim=0)
    sentence, length, out = state.sentence, state.length, []
    for end in ends.tolist():
        out.append(sentence)
        length += 1
        if end or length == max_len:
            sentence, length = sentence + 1, 0
    return out, SegmentState(sentence, length)


class Segmenter:
    """The text's segmentation, shared by the layers of one cache: sinks first, then sentences."""

    def __init__(self, is_boundary: torch.Tensor | None, max_len: int, sink: int):
        self.is_boundary, self.max_len, self.sink = is_boundary, max_len, sink
        self.state = SegmentState()
        self.position = 0  # text tokens segmented so far
        self.step_start, self.step_ids = 0, []  # the latest step: its first position, its sentence ids

    def observe(self, ids: torch.Tensor | None, new: int | None = None) -> None:
        """Segment the next step's token ids, (batch, tokens); ``ids=None``: ``new`` tokens of unknown ids."""
        table = self.is_boundary if ids is not None else None
        ids = torch.zeros(1, new, dtype=torch.long) if ids is None else ids
        sinks = max(0, min(ids.shape[-1], self.sink - self.position))
        rest, self.state = segment(ids[..., sinks:], table, self.max_len, self.state)
        self.step_start, self.step_ids = self.position, [SINK] * sinks + rest
        self.position += ids.shape[-1]

    def sentence_ids(self, start: int, new: int) -> list[int]:
        """Sentence ids of text positions [start, start + new) (length rule only if no ids were seen)."""
        if start == self.position:
            self.observe(None, new)
        if (start, new) != (self.step_start, len(self.step_ids)):
            raise LeanLMError(f"sentence_tier: tokens [{start}, {start + new}) were not the last step segmented "
                              f"([{self.step_start}, {self.step_start + len(self.step_ids)})); feed every step once")
        return self.step_ids

    def reset(self) -> None:
        self.state, self.position, self.step_start, self.step_ids = SegmentState(), 0, 0, []

    @property
    def closed(self) -> int:
        """Sentences closed so far."""
        return self.state.sentence
