"""``SentenceTierLayer``: one layer's fast tier (sinks, open sentence, summaries, resident sentences)."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

from leanlm.kvcache.base import PolicyLayer, tensor_bytes
from leanlm.kvcache.sentence.coarse import CoarseMap
from leanlm.kvcache.sentence.index import SemanticIndex
from leanlm.kvcache.sentence.segment import SINK, Segmenter
from leanlm.kvcache.sentence.stores import SlowStore
from leanlm.kvcache.sentence.summary import sentence_scores, summarize


class StepLog(NamedTuple):
    new: int  # tokens this step
    fetched: int  # bytes slow → fast
    written: int  # bytes fast → slow
    attended: tuple[int, ...]  # sentences attended to (text order)


def cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """a then b along the token dim; a copy of b when a is None (never a view of the step's K/V)."""
    return b.clone() if a is None else torch.cat([a, b], dim=2)


def runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(id, start, end) of each run of equal consecutive ids."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            out.append((ids[start], start, i))
            start = i
    return out


class SentenceTierLayer(PolicyLayer):
    def __init__(self, retrieve: int, components: int, store: SlowStore, segmenter: Segmenter,
                 coarse: CoarseMap | None = None, vote: bool = False, recent: int = 0, capacity: int | None = None,
                 bounds: bool = False, recent_share: float = 0.0, budget_tokens: float | None = None):
        super().__init__()
        self.capacity = capacity  # most tokens of retrieved sentences resident at once (None: B alone bounds)
        # the fast tier's size in this layer's tokens (K and V): the room for retrieved sentences is what
        # the sinks, open sentence, summaries and index really held leave of it (None: ``capacity`` alone)
        self.budget_tokens = budget_tokens
        self.retrieve, self.components, self.slow, self.vote = retrieve, components, store, vote
        self.recent = recent  # of the B, the latest closed sentences always attended
        self.bounds = bounds  # summaries are mean, min, max keys (else mean + principal directions)
        self.recent_share = recent_share  # the latest sentences also fill this share of ``capacity``
        self.segmenter = segmenter  # replaced by the cache's shared one in SentenceTier.hooks
        self.coarse = coarse  # None: sentences not fetched are dropped; else one pseudo-token each
        self.index: SemanticIndex | None = None  # set by SentenceTier.hooks with index="minilm"
        self.count_index = False  # the shared index's bytes are counted once, in layer 0
        self.clear_state()

    def clear_state(self) -> None:
        self.sink_k = self.sink_v = None  # (batch, kv_heads, <= sink, head_dim)
        self.open_k = self.open_v = None  # the open sentence, (batch, kv_heads, tokens, head_dim)
        self.open_id = 0
        self.token_nbytes = 0  # K and V of one token, all rows and KV heads (known from the first step)
        self.summaries = None  # (batch, kv_heads, closed sentences, 1 + components, head_dim)
        self.value_means = None  # (batch, kv_heads, closed sentences, head_dim), kept with a coarse tier
        self.lengths: list[int] = []  # tokens of each closed sentence
        self.resident: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # LRU, oldest first
        self.chosen: list[int] | None = None  # this step's retrieved sentences, set by select
        self.fetched_bytes = self.written_bytes = 0
        self.step_fetched = self.step_written = 0
        self.log: list[StepLog] = []

    # -- the step ---------------------------------------------------------------------------

    def select(self, queries: torch.Tensor | None) -> None:
        """Retrieve this step's top-B sentences (no queries: keep the resident ones), evict beyond B."""
        closed = len(self.lengths)
        if queries is None and self.index is None:
            chosen = list(self.resident)
        elif closed == 0 or self.retrieve == 0:
            chosen = []
        else:
            latest = self.latest(closed)  # always wanted first
            if self.index is not None:
                ranked = self.index.top(closed, closed)
            else:
                scores = sentence_scores(queries, self.summaries, vote=self.vote, bounds=self.bounds)
                ranked = scores.argsort(descending=True).tolist()
            chosen = self.fill(latest + [s for s in ranked if s not in latest])
        for sentence in sorted(chosen):
            if sentence not in self.resident:
                self.resident[sentence] = self.slow.get(sentence, self.device)
                self.step_fetched += tensor_bytes(*self.resident[sentence])
            self.resident.move_to_end(sentence)
        self.trim()
        self.chosen = sorted(chosen)

    def latest(self, closed: int) -> list[int]:
        """The latest closed sentences, newest first: ``recent`` of them, and at least ``recent_share`` of capacity."""
        share = self.recent_share * (self.room() or 0)
        out, tokens = [], 0
        for sentence in range(closed - 1, -1, -1):
            if len(out) >= self.recent and tokens >= share:
                break
            out.append(sentence)
            tokens += self.lengths[sentence]
        return out

    def fill(self, ranked: list[int]) -> list[int]:
        """The first sentences of ``ranked`` that fit: at most B, and at most ``capacity`` tokens."""
        chosen, tokens, room = [], 0, self.room()
        for sentence in ranked:
            if len(chosen) == self.retrieve:
                break
            if room is None or tokens + self.lengths[sentence] <= room:
                chosen.append(sentence)
                tokens += self.lengths[sentence]
        return chosen

    def trim(self) -> None:
        """Evict least recently used sentences beyond B (or beyond the ``room`` tokens)."""
        room = self.room()

        def over() -> bool:
            tokens = sum(k.shape[2] for k, _ in self.resident.values())
            return len(self.resident) > self.retrieve or (room is not None and tokens > room)

        while self.resident and over():
            self.resident.popitem(last=False)

    def room(self) -> int | None:
        """Tokens of retrieved sentences that fit now: ``capacity``, and with a budget what the fast
        tier's budget leaves beside the tensors it really holds besides them (sinks, open sentence,
        summaries, value means, the index). None: no bound but B."""
        if self.budget_tokens is None or not self.token_nbytes:
            return self.capacity
        fixed = tensor_bytes(self.sink_k, self.sink_v, self.open_k, self.open_v, self.summaries, self.value_means)
        fixed += self.index.nbytes() if self.index is not None and self.count_index else 0
        room = max(0, int((self.budget_tokens * self.token_nbytes - fixed) // self.token_nbytes))
        return room if self.capacity is None else min(room, self.capacity)

    def materialize(self):
        if self.chosen is None:  # no attention hook ran (a bare layer): select here
            self.select(self.queries)
        sentences = [self.resident[s] for s in sorted(self.resident)]
        parts = [(self.sink_k, self.sink_v), self.pseudo_tokens(), *sentences, (self.open_k, self.open_v)]
        parts = [p for p in parts if p[0] is not None]
        if not parts:
            return None, None
        return torch.cat([k for k, _ in parts], dim=2), torch.cat([v for _, v in parts], dim=2)

    def coarse_sentences(self) -> list[int]:
        """Closed sentences seen only through their pseudo-token (all not resident; none without a coarse tier)."""
        if self.coarse is None:
            return []
        return [s for s in range(len(self.lengths)) if s not in self.resident]

    def pseudo_tokens(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One reconstructed K/V per coarse sentence (a transient copy, rebuilt each step)."""
        coarse = self.coarse_sentences()
        if not coarse:
            return None, None
        index = torch.tensor(coarse, device=self.summaries.device)
        keys = self.coarse.keys(self.summaries[:, :, index, 0])  # the mean keys
        return keys, self.coarse.values(self.value_means[:, :, index])

    def past_bias(self) -> torch.Tensor | None:
        """(kv_heads, held) additive attention-logit bias of the held tokens: log n_j + β on pseudo-tokens."""
        coarse = self.coarse_sentences()
        if not coarse:
            return None
        sink = 0 if self.sink_k is None else self.sink_k.shape[2]
        bias = self.coarse.logit_bias(torch.tensor([self.lengths[s] for s in coarse], device=self.device))
        rest = self.held_tokens() - sink - len(coarse)
        return torch.nn.functional.pad(bias, (sink, rest))

    def store(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> None:
        new_k, new_v = keys[:, :, -new:], values[:, :, -new:]  # (batch, kv_heads, new, head_dim)
        self.token_nbytes = self.token_nbytes or tensor_bytes(new_k[:, :, :1], new_v[:, :, :1])
        ids = self.segmenter.sentence_ids(self.seen, new)
        for sentence, start, end in runs(ids):
            k, v = new_k[:, :, start:end], new_v[:, :, start:end]
            if sentence == SINK:
                self.sink_k, self.sink_v = cat(self.sink_k, k), cat(self.sink_v, v)
                continue
            if self.open_k is None:
                self.open_id = sentence
            assert sentence == self.open_id, "sentences arrive in order"
            self.open_k, self.open_v = cat(self.open_k, k), cat(self.open_v, v)
            if sentence < self.segmenter.closed:
                self.close_open()
        if self.budget_tokens is not None:
            self.trim()  # the step's tokens joined the open sentence: keep the fast tier within its budget
        self.log.append(StepLog(new, self.step_fetched, self.step_written, tuple(self.chosen or ())))
        self.fetched_bytes += self.step_fetched
        self.written_bytes += self.step_written
        self.step_fetched = self.step_written = 0
        self.chosen = None

    def close_open(self) -> None:
        """Summarize the open sentence, write it to the slow tier, keep it as most recently used."""
        assert self.open_id == len(self.lengths), "sentences close in order"
        if self.index is None or self.coarse is not None:  # the key index and the coarse tier read them
            summary = summarize(self.open_k, self.components, self.bounds)[:, :, None]  # (batch, kv_heads, 1, m, head_dim)
            self.summaries = summary if self.summaries is None else torch.cat([self.summaries, summary], dim=2)
        if self.coarse is not None:
            mean_v = self.open_v.float().mean(dim=2, keepdim=True).to(self.open_v.dtype)
            self.value_means = mean_v if self.value_means is None else torch.cat([self.value_means, mean_v], dim=2)
        self.lengths.append(self.open_k.shape[2])
        self.slow.put(self.open_id, self.open_k, self.open_v)
        self.step_written += tensor_bytes(self.open_k, self.open_v)
        self.resident[self.open_id] = (self.open_k, self.open_v)
        self.open_k = self.open_v = None  # before trim: the sentence is now resident, not open
        self.trim()

    # -- accounting -------------------------------------------------------------------------

    def held_tokens(self) -> int:
        sink = 0 if self.sink_k is None else self.sink_k.shape[2]
        open_ = 0 if self.open_k is None else self.open_k.shape[2]
        return sink + len(self.coarse_sentences()) + sum(k.shape[2] for k, _ in self.resident.values()) + open_

    def fast_nbytes(self) -> int:
        """Sinks, open sentence, summaries (and value means) and resident sentences: every tensor kept.

        Pseudo-tokens are rebuilt each step from the summaries: transient, counted in ``peak``.
        """
        resident = sum(tensor_bytes(k, v) for k, v in self.resident.values())
        index = self.index.nbytes() if self.index is not None and self.count_index else 0
        return tensor_bytes(self.sink_k, self.sink_v, self.open_k, self.open_v, self.summaries,
                            self.value_means) + resident + index

    def slow_nbytes(self) -> int:
        return self.slow.nbytes()

    def nbytes(self) -> int:
        return self.fast_nbytes()

    def reset(self) -> None:
        super().reset()
        self.clear_state()
        self.slow.clear()
        self.segmenter.reset()
        if self.index is not None:
            self.index.reset()
