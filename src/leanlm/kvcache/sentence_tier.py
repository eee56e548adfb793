"""SentenceKV-style two-tier cache: sentence summaries in fast memory, token K/V in a slow store.

Much of K and V is redundant across the tokens of a sentence. So the text is cut into sentences, each
closed sentence keeps a small *summary* in fast memory, its token K/V go to a larger, slower tier, and
each step brings back only the sentences its queries need.

Segmentation (``segment``, pure): a sentence closes after a token whose text ends with ``.``, ``!``,
``?`` or a newline (``boundary_token_ids`` builds that table from a tokenizer once), or when it reaches
``max_sentence`` tokens. The first ``sink`` tokens of the text are attention sinks, in no sentence.
Cache layers only see K/V, so a hook on the base model feeds each step's token ids to a ``Segmenter``
that all layers of the cache share. Without a table (``use_tokenizer`` not called) or without token
ids (``inputs_embeds``), only the length rule applies. With a batch, a boundary in any row closes the
sentence for every row: the batch shares one segmentation.

Per layer (``SentenceTierLayer``):
- fast tier: sinks, the open sentence, one summary per closed sentence and KV head (the mean key;
  ``summary="pca"`` adds the top principal directions scaled by their spread, ``"bounds"`` the
  channel-wise min and max), and the token K/V of the retrieved sentences, kept in an LRU bounded
  by ``retrieve`` (B) sentences and ``capacity`` tokens;
- slow tier (``SlowStore``): every closed sentence's token K/V — ``MemoryStore`` (CPU tensors, pinned
  when the model runs on a GPU) or ``MmapStore`` (raw bytes appended to one file per layer, read back
  through a memory map, so the slow tier can outgrow RAM). Token K/V really leave the fast tier: a
  sentence that is not retrieved is not held there at all (the published SentenceKV code masks).
- each step, an attention pre-hook picks the sentences to attend: first the latest closed ones
  (``recent`` of them and at least ``recent_share`` of ``capacity``), then the best ranked by the
  index, while they fit B and ``capacity``; it fetches those not resident, evicts the least recently
  used beyond the bounds, and resizes the step's causal mask to what this layer attends to (layers
  differ, the model builds one mask). Attention runs over sinks + retrieved sentences (text order) +
  open sentence + new tokens: with B >= the number of sentences that is the full cache, bit for bit.
- the index: ``"keys"`` scores the summaries with the step's queries (mean over the queries and the
  KV group's query heads of q·s_j, or a per-query softmax vote with ``select="vote"``; one choice
  per layer, shared by the KV heads and the batch); ``"minilm"`` asks a frozen sentence encoder
  (``sentence_index.py``) which closed sentences resemble the last ``query_tokens`` tokens — one
  ranking for all layers; ``"auto"`` (default) is minilm when a tokenizer was given and its weights
  are installed. Measured on SmolLM2-135M, minilm is the better index by far (README).
- a sentence that closes is summarized, written to the slow store and enters the LRU as most
  recently used (the next tokens are likely to look at it).

Bytes: ``nbytes()`` is the fast tier (what a budget counts); ``slow_nbytes()`` the slow tier;
``fetched_bytes`` / ``written_bytes`` the traffic between them, and ``log`` one ``StepLog`` per step
(new tokens, bytes moved, sentences attended). ``tier_stats(cache)`` sums them over layers, with the
bytes moved per generated (single-token) step. On a CPU-only machine both tiers live in RAM (the mmap
store in the page cache): the tiers are separate tensors and counted honestly, not separate devices.

Coarse tier (``coarse="mean"|"learned"``): a closed sentence that is not fetched is not dropped but
seen as one pseudo-token rebuilt from its mean key and mean value (the fast tier then also keeps the
mean value), with an attention-logit bias log n_j; ``"learned"`` maps are trained by distillation on
WikiText-2 validation (``leanlm.kvcache.reconstruction``). The pseudo-tokens are rebuilt each step:
transient, counted in ``peak``. The mask becomes a float mask per query head to carry the bias.

Not done yet: per-head selection, overlapping fetches with compute (prefetch), a quantized slow
tier, per-row segmentation for batches.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import CachePolicy, PolicyCache, PolicyLayer, check_budget, tensor_bytes
from leanlm.kvcache.reconstruction import CoarseMap, CoarseMaps
from leanlm.kvcache.sentence_index import SemanticIndex, minilm_installed, shared_encoder
from leanlm.models import decoder_layers

SINK = -1  # the "sentence" of the attention-sink tokens
log = logging.getLogger("leanlm")


# ---------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Slow tier
# ---------------------------------------------------------------------------------------------


class SlowStore:
    """Where closed sentences' token K/V live. ``get`` returns fresh tensors (the fetch is a real copy)."""

    def put(self, sentence: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def get(self, sentence: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t`` (pinned when ``t`` is on a GPU, so copies back can be asynchronous)."""
    return t.to("cpu", copy=True).pin_memory() if t.is_cuda else t.to("cpu", copy=True)


class MemoryStore(SlowStore):
    """CPU tensors (pinned when the K/V come from a GPU, so fetches can be asynchronous copies)."""

    def __init__(self):
        self.sentences: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, sentence, keys, values):
        self.sentences[sentence] = to_host(keys), to_host(values)

    def get(self, sentence, device):
        keys, values = self.sentences[sentence]
        return keys.to(device, copy=True), values.to(device, copy=True)

    def nbytes(self) -> int:
        return sum(tensor_bytes(*pair) for pair in self.sentences.values())

    def clear(self) -> None:
        self.sentences.clear()


class Block(NamedTuple):
    offset: int  # bytes into the file
    shape: tuple[int, ...]  # of keys and of values, (batch, kv_heads, tokens, head_dim)
    dtype: torch.dtype


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes, exactly (bf16 included: numpy has no bf16, so go through uint8)."""
    return t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()


def remove_file(file, path: str) -> None:
    file.close()
    if os.path.exists(path):
        os.remove(path)


class MmapStore(SlowStore):
    """Sentence K/V as raw bytes appended to one file (keys, then values), read through a memory map.

    The file is created in ``directory`` (default: the system temp dir) and removed with the store.
    """

    def __init__(self, directory: str | None = None, prefix: str = "sentence-kv-"):
        fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=".kv", dir=directory)
        self.file = os.fdopen(fd, "wb")
        self.blocks: dict[int, Block] = {}
        self.size = 0  # bytes written
        self.map: np.memmap | None = None
        weakref.finalize(self, remove_file, self.file, self.path)

    def put(self, sentence, keys, values):
        block = np.concatenate([raw_bytes(keys), raw_bytes(values)])
        self.file.write(block.tobytes())
        self.file.flush()
        self.blocks[sentence] = Block(self.size, tuple(keys.shape), keys.dtype)
        self.size += block.nbytes

    def get(self, sentence, device):
        offset, shape, dtype = self.blocks[sentence]
        if self.map is None or self.map.shape[0] < self.size:  # the file grew since it was mapped
            self.map = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.size,))
        half = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        raw = torch.from_numpy(np.array(self.map[offset:offset + 2 * half]))  # the copy out of the file
        keys, values = raw[:half].view(dtype).view(shape), raw[half:].view(dtype).view(shape)
        return keys.to(device), values.to(device)

    def nbytes(self) -> int:
        return self.size

    def clear(self) -> None:
        self.file.truncate(0)
        self.file.seek(0)
        self.blocks, self.size, self.map = {}, 0, None


SLOW_STORES = {"memory": MemoryStore, "mmap": MmapStore}


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


def summarize(keys: torch.Tensor, components: int, bounds: bool = False) -> torch.Tensor:
    """keys (batch, kv_heads, n, head_dim) → (batch, kv_heads, m, head_dim).

    Row 0 is the mean key. ``bounds``: rows 1, 2 are the channel-wise min and max of the keys
    (m = 3). Else rows 1.. are the top principal directions of the keys, scaled by their standard
    deviation (zero rows when the sentence has fewer tokens than components; m = 1 + components).
    """
    mean = keys.float().mean(dim=2, keepdim=True)  # (batch, kv_heads, 1, head_dim)
    if bounds:
        return torch.cat([mean.to(keys.dtype), keys.amin(dim=2, keepdim=True), keys.amax(dim=2, keepdim=True)], dim=2)
    if components == 0:
        return mean.to(keys.dtype)
    _, spread, directions = torch.linalg.svd(keys.float() - mean, full_matrices=False)  # (.., r), (.., r, d)
    r = min(components, spread.shape[-1])
    scaled = directions[..., :r, :] * (spread[..., :r, None] / keys.shape[2] ** 0.5)
    pad = keys.new_zeros(*keys.shape[:2], components - r, keys.shape[3], dtype=torch.float32)
    return torch.cat([mean, scaled, pad], dim=2).to(keys.dtype)


def sentence_scores(queries: torch.Tensor, summaries: torch.Tensor, vote: bool = False,
                    bounds: bool = False) -> torch.Tensor:
    """How much this step's queries want each sentence: (n,), shared by the batch and the KV heads.

    queries (batch, heads, q, d); summaries (batch, kv_heads, n, m, d). Per query head and query,
    logit = q·mean key plus, for principal directions, |q·direction| (the spread of the sentence's
    logits); with ``bounds`` (summaries = mean, min, max) logit = q⁺·max + q⁻·min, the largest q·k
    any token of the sentence can reach (Quest's page bound). ``vote=False``: the logits averaged over the batch, the heads and the step's queries.
    ``vote=True``: each query head and query turns its logits into a distribution over sentences
    (softmax at 1/√d, as attention would) and the distributions are averaged — a sentence a few
    queries want strongly (a question's answer) is not drowned by a long chunk's average query.
    """
    batch, heads, q_len, dim = queries.shape
    kv_heads = summaries.shape[1]
    grouped = queries.float().view(batch, kv_heads, heads // kv_heads, q_len, dim)
    if bounds:
        low, high = summaries[:, :, :, 1].float(), summaries[:, :, :, 2].float()  # (batch, kv, n, d)
        logits = (torch.einsum("bhgqd,bhnd->bhgqn", grouped.clamp(min=0), high)
                  + torch.einsum("bhgqd,bhnd->bhgqn", grouped.clamp(max=0), low))
    else:
        logits = torch.einsum("bhgqd,bhnmd->bhgqnm", grouped, summaries.float())
        logits = logits[..., 0] + logits[..., 1:].abs().sum(dim=-1)  # (batch, kv, group, q, n)
    if vote:
        logits = torch.softmax(logits / dim**0.5, dim=-1)
    return logits.mean(dim=(0, 1, 2, 3))


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
                 bounds: bool = False, recent_share: float = 0.0):
        super().__init__()
        self.capacity = capacity  # most tokens of retrieved sentences resident at once (None: B alone bounds)
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
        share = self.recent_share * (self.capacity or 0)
        out, tokens = [], 0
        for sentence in range(closed - 1, -1, -1):
            if len(out) >= self.recent and tokens >= share:
                break
            out.append(sentence)
            tokens += self.lengths[sentence]
        return out

    def fill(self, ranked: list[int]) -> list[int]:
        """The first sentences of ``ranked`` that fit: at most B, and at most ``capacity`` tokens."""
        chosen, tokens = [], 0
        for sentence in ranked:
            if len(chosen) == self.retrieve:
                break
            if self.capacity is None or tokens + self.lengths[sentence] <= self.capacity:
                chosen.append(sentence)
                tokens += self.lengths[sentence]
        return chosen

    def trim(self) -> None:
        """Evict least recently used sentences beyond B (or beyond ``capacity`` tokens)."""
        def over() -> bool:
            tokens = sum(k.shape[2] for k, _ in self.resident.values())
            return len(self.resident) > self.retrieve or (self.capacity is not None and tokens > self.capacity)

        while self.resident and over():
            self.resident.popitem(last=False)

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
        self.trim()
        self.open_k = self.open_v = None

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


# ---------------------------------------------------------------------------------------------
# Hooks: token ids in, per-layer selection and mask
# ---------------------------------------------------------------------------------------------


def fit_mask(mask: torch.Tensor | None, held: int, q_len: int, device=None) -> torch.Tensor | None:
    """The step's causal mask re-sized to ``held`` attended tokens before the ``q_len`` new ones.

    ``mask``: (batch, 1, q, old_held + q), bool (sdpa: True = attend) or additive float (eager), or
    None (sdpa's implicit causal mask). Every held token is visible to every new query.
    """
    if mask is None:
        if q_len == 1 or held == 0:
            return None  # one query sees everything; or nothing held: sdpa's is_causal is right
        # bottom-right causal: query i sees the held tokens and new tokens 0..i
        visible = torch.ones(q_len, held + q_len, dtype=torch.bool, device=device).tril(diagonal=held)
        return visible[None, None]
    if mask.shape[-1] == held + q_len:
        return mask
    open_value = True if mask.dtype == torch.bool else 0.0
    if not (mask[..., :-q_len] == open_value).all():
        raise LeanLMError("sentence_tier needs unpadded inputs: every held token must be visible to every query")
    past = torch.full((*mask.shape[:-1], held), open_value, dtype=mask.dtype, device=mask.device)
    return torch.cat([past, mask[..., -q_len:]], dim=-1)


def step_cache(kwargs: dict):
    """The cache a forward was given: ``cache=`` since transformers 5.24, ``past_key_values=`` before."""
    return kwargs["cache"] if kwargs.get("cache") is not None else kwargs.get("past_key_values")


def feed_token_ids(module: nn.Module, args: tuple, kwargs: dict, cache: PolicyCache, segmenter: Segmenter,
                   index: SemanticIndex | None = None) -> None:
    """Forward pre-hook on the base model: segment the step's token ids (when this cache is used)."""
    if step_cache(kwargs) is not cache:
        return
    ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else (args[0] if args else None)
    if ids is not None:
        segmenter.observe(ids)
    if index is not None:
        if ids is None:
            raise LeanLMError("sentence_tier index='minilm' reads the text: call the model with input_ids")
        index.observe(ids[0].tolist(), segmenter.step_ids, segmenter.closed)  # the batch shares one segmentation


def select_and_fit_mask(module: nn.Module, args: tuple, kwargs: dict, cache: PolicyCache):
    """Forward pre-hook on an attention module: retrieve this layer's sentences, resize the mask."""
    if step_cache(kwargs) is not cache:
        return None
    layer = cache.layers[module.layer_idx]
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (batch, q, hidden)
    if not layer.is_initialized:
        return None  # the first step: nothing held, nothing to retrieve
    layer.select(layer.queries)
    mask = fit_mask(kwargs.get("attention_mask"), layer.held_tokens(), hidden.shape[1], hidden.device)
    bias = layer.past_bias()
    if bias is not None:
        mask = add_past_bias(mask, bias, module.config.num_attention_heads, hidden.shape[1], hidden.dtype)
    kwargs["attention_mask"] = mask
    return args, kwargs


def add_past_bias(mask: torch.Tensor | None, bias: torch.Tensor, heads: int, q_len: int, dtype) -> torch.Tensor:
    """An additive float mask (batch, heads, q, held + q): ``mask`` (bool/float/None) + ``bias`` on held tokens.

    ``bias``: (kv_heads, held), shared by the query heads of each KV group.
    """
    held = bias.shape[1]
    if mask is None:  # sdpa's implicit causal mask, made explicit
        mask = torch.ones(q_len, held + q_len, dtype=torch.bool, device=bias.device).tril(diagonal=held)[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    per_head = bias.repeat_interleave(heads // bias.shape[0], dim=0)  # (heads, held)
    past = mask[..., :held] + per_head[None, :, None].to(mask.dtype)
    return torch.cat([past, mask[..., held:].expand(*past.shape[:-1], -1)], dim=-1)


# ---------------------------------------------------------------------------------------------
# The policy
# ---------------------------------------------------------------------------------------------


@dataclass
class SentenceTier(CachePolicy):
    """Sinks + open sentence + sentence summaries + ``retrieve`` fetched sentences in fast memory."""

    name: ClassVar[str] = "sentence_tier"
    needs_queries: ClassVar[bool] = True
    sink: int = 4  # first tokens kept in full (attention sinks)
    max_sentence: int = 64  # a sentence closes at this many tokens if no boundary came first
    retrieve: int = 8  # B: sentences whose token K/V may be in fast memory at once
    recent: int = 0  # of the B, this many latest closed sentences are always attended (the rest by score)
    recent_share: float = 0.5  # ... and the latest sentences fill at least this share of ``capacity`` tokens
    capacity: int | None = None  # most tokens of retrieved sentences in fast memory (None: B sentences bound it)
    summary: str = "mean"  # "mean": the mean key; "pca": + top principal directions; "bounds": + min, max keys
    select: str = "mean"  # "mean": top-B by the mean query's logits; "vote": by averaged per-query softmax
    index: str = "auto"  # what ranks sentences: "keys" (queries · summaries) | "minilm" (a sentence encoder) |
    # "auto": minilm when a tokenizer was given and its weights are installed, else keys
    query_tokens: int = 16  # index="minilm": the recent tokens embedded as the step's query (16: the question, not the page)
    components: int = 2  # principal directions per sentence and KV head (summary="pca")
    store: str = "memory"  # slow tier: "memory" (CPU tensors) | "mmap" (a file per layer)
    store_dir: str | None = None  # where "mmap" files go (default: the system temp dir)
    coarse: str = "none"  # sentences not fetched: "none" (dropped) | "mean" | "learned" (one pseudo-token each)
    maps: str | None = None  # coarse="learned": the trained maps (benchmarks/sentence_reconstruction.py)

    def __post_init__(self):
        if self.capacity is not None and self.capacity < 0:
            raise LeanLMError(f"sentence_tier capacity must be >= 0 tokens, got {self.capacity}")
        if self.sink < 0 or self.max_sentence < 1 or self.retrieve < 0 or self.components < 1 or self.recent < 0:
            raise LeanLMError(f"sentence_tier needs sink >= 0, max_sentence >= 1, retrieve >= 0, recent >= 0 and "
                              f"components >= 1, got {self.sink}, {self.max_sentence}, {self.retrieve}, "
                              f"{self.recent}, {self.components}")
        if self.summary not in ("mean", "pca", "bounds"):
            raise LeanLMError(f"sentence_tier summary must be 'mean', 'pca' or 'bounds', got '{self.summary}'")
        if self.select not in ("mean", "vote"):
            raise LeanLMError(f"sentence_tier select must be 'mean' or 'vote', got '{self.select}'")
        if self.index not in ("keys", "minilm", "auto"):
            raise LeanLMError(f"sentence_tier index must be 'keys', 'minilm' or 'auto', got '{self.index}'")
        if not 0 <= self.recent_share <= 1:
            raise LeanLMError(f"sentence_tier recent_share must be in [0, 1], got {self.recent_share}")
        if self.store not in SLOW_STORES:
            raise LeanLMError(f"sentence_tier store must be one of {', '.join(SLOW_STORES)}, got '{self.store}'")
        if self.coarse not in ("none", "mean", "learned"):
            raise LeanLMError(f"sentence_tier coarse must be 'none', 'mean' or 'learned', got '{self.coarse}'")
        if (self.coarse == "learned") != (self.maps is not None):
            raise LeanLMError("sentence_tier: coarse='learned' needs maps=PATH (and maps only go with it)")
        self.boundary_table: torch.Tensor | None = None  # (vocab,) bool; None: the length rule only
        self.tokenizer = None  # index="minilm" decodes sentences with it
        self.coarse_maps: CoarseMaps | None = None  # loaded on the first make_layer

    def use_tokenizer(self, tokenizer) -> SentenceTier:
        """Close sentences at tokens that end with ., !, ? or a newline (see ``boundary_token_ids``)."""
        self.tokenizer = tokenizer
        return self.use_boundaries(boundary_token_ids(tokenizer))

    def use_boundaries(self, table: torch.Tensor) -> SentenceTier:
        self.boundary_table = torch.as_tensor(table, dtype=torch.bool)
        return self

    @property
    def summary_vectors(self) -> int:
        """Vectors per sentence summary and KV head."""
        return {"mean": 1, "pca": 1 + self.components, "bounds": 3}[self.summary]

    def make_layer(self, layer_idx: int, model: nn.Module) -> SentenceTierLayer:
        store = MmapStore(self.store_dir, prefix=f"sentence-kv-layer{layer_idx:03d}-") if self.store == "mmap" \
            else MemoryStore()
        segmenter = Segmenter(self.boundary_table, self.max_sentence, self.sink)
        return SentenceTierLayer(self.retrieve, self.summary_vectors - 1, store, segmenter,
                                 self.coarse_map(layer_idx, model), vote=self.select == "vote", recent=self.recent,
                                 capacity=self.capacity, bounds=self.summary == "bounds",
                                 recent_share=self.recent_share)

    def coarse_map(self, layer_idx: int, model: nn.Module) -> CoarseMap | None:
        if self.coarse == "none":
            return None
        if getattr(model.config, "leanlm_kv_heads_per_layer", None):
            raise LeanLMError("sentence_tier coarse tier needs the same KV heads in every layer (a uniform model)")
        if self.coarse_maps is None:
            self.coarse_maps = CoarseMaps.identity(model) if self.coarse == "mean" else CoarseMaps.load(self.maps, model)
            self.coarse_maps.requires_grad_(False).to(next(model.parameters()).device)
        return self.coarse_maps.layers[layer_idx]

    def hooks(self, model: nn.Module, cache: PolicyCache) -> list:
        segmenter = Segmenter(self.boundary_table, self.max_sentence, self.sink)
        for layer in cache.layers:
            layer.segmenter = segmenter  # one segmentation of the text for every layer
        index = self.semantic_index()
        if index is not None:
            for layer in cache.layers:
                layer.index = index
            cache.layers[0].count_index = True
        feed = lambda module, args, kwargs: feed_token_ids(module, args, kwargs, cache, segmenter, index)  # noqa: E731
        handles = [model.model.register_forward_pre_hook(feed, with_kwargs=True)]  # the base model sees the ids
        select = lambda module, args, kwargs: select_and_fit_mask(module, args, kwargs, cache)  # noqa: E731
        for layer in decoder_layers(model):
            handles.append(layer.self_attn.register_forward_pre_hook(select, with_kwargs=True))
        return handles

    @property
    def resolved_index(self) -> str:
        """The index this policy uses ("auto" resolved)."""
        if self.index != "auto":
            return self.index
        return "minilm" if self.tokenizer is not None and minilm_installed() else "keys"

    def semantic_index(self) -> SemanticIndex | None:
        if self.resolved_index == "keys":
            return None
        if self.tokenizer is None:
            raise LeanLMError("sentence_tier index='minilm' needs the tokenizer (make_policy(..., tokenizer) "
                              "or policy.use_tokenizer(tokenizer))")
        return SemanticIndex(shared_encoder(), self.tokenizer.decode, self.query_tokens)

    def nominal_tokens(self, context: int) -> float:
        """Fast-tier size in token equivalents (a token holds K and V; a summary vector is half of one).

        sinks + a full open sentence + B full sentences + the summaries of ~2·context/max_sentence
        sentences (sentences assumed half the maximum length on average).
        """
        sentences = -(-2 * context // self.max_sentence)
        retrieved = self.max_sentence * self.retrieve if self.capacity is None else min(self.capacity, self.max_sentence * self.retrieve)
        keys_kept = self.resolved_index == "keys" or self.coarse != "none"  # minilm alone: ~0 (one small vector per sentence)
        vectors = self.summary_vectors * keys_kept + (self.coarse != "none")  # a coarse tier keeps the mean value too
        return self.sink + self.max_sentence + retrieved + sentences * vectors / 2

    @classmethod
    def for_budget(cls, budget: float, context: int, **settings) -> SentenceTier:
        """Retrieved sentences that fit ``budget`` × ``context`` beside the rest of ``nominal_tokens``.

        What the sinks, a full open sentence and the summaries leave is the token ``capacity`` of the
        retrieved sentences (real sentences are shorter than ``max_sentence``: a token bound uses the
        budget, a count of maximal sentences would leave most of it idle). B = capacity // 16 bounds the
        sentences fetched per step. Below sinks + one open sentence + the summaries the budget cannot be
        met: capacity 0 (lower ``max_sentence``).
        At budget 1, B = ``context``: every sentence can be retrieved (the exact reference; its fast
        tier holds the summaries on top of the full cache). ``group`` (the quantization group other
        policies take) is ignored: SentenceKV keeps K/V in full precision.
        """
        check_budget(budget)
        settings.pop("group", None)
        if settings.get("bits") is not None:
            raise LeanLMError("sentence_tier keeps K/V in full precision: it does not combine with +int8/+int4/+int2")
        settings.pop("bits", None)
        tokenizer = settings.pop("tokenizer", None)
        with_tokenizer = lambda p: p.use_tokenizer(tokenizer) if tokenizer is not None else p  # noqa: E731
        policy = with_tokenizer(cls(**settings))
        if budget >= 1:
            return with_tokenizer(replace(policy, retrieve=max(1, context)))
        room = max(0, int(budget * context - with_tokenizer(replace(policy, retrieve=0)).nominal_tokens(context)))
        if room == 0:  # legal, but the model then sees only the sinks and the open sentence: say so
            warn_no_room(budget, context)
        return with_tokenizer(replace(policy, retrieve=room // 16, capacity=room))

    def describe(self) -> dict:
        described = super().describe()
        described["boundaries"] = "length only" if self.boundary_table is None else "tokenizer table"
        described["index"] = self.resolved_index
        return described


@functools.lru_cache(maxsize=None)  # once per setting: a protocol sizes a policy for every window
def warn_no_room(budget: float, context: int) -> None:
    log.warning("sentence_tier: a budget of %g x %d tokens leaves no room to fetch sentences (only sinks + the open "
                "sentence are attended); raise the budget or the context, or lower max_sentence", budget, context)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


@dataclass
class TierStats:
    fast_bytes: int  # held in the fast tier now, all layers
    slow_bytes: int  # held in the slow tier now
    fetched_bytes: int  # moved slow → fast so far
    written_bytes: int  # moved fast → slow so far
    decode_steps: int  # single-token steps (generated tokens)
    moved_per_decode_token: float  # mean bytes moved (both ways) per single-token step, all layers

    def to_dict(self) -> dict:
        return asdict(self)


def tier_stats(cache: PolicyCache) -> TierStats:
    """Bytes in each tier and the traffic between them, summed over a SentenceTier cache's layers."""
    layers = cache.layers
    decode = [entry for layer in layers for entry in layer.log if entry.new == 1]
    steps = len(decode) // max(1, len(layers))
    moved = sum(entry.fetched + entry.written for entry in decode)
    return TierStats(sum(layer.fast_nbytes() for layer in layers), sum(layer.slow_nbytes() for layer in layers),
                     sum(layer.fetched_bytes for layer in layers), sum(layer.written_bytes for layer in layers),
                     steps, moved / steps if steps else 0.0)


__all__ = ["MemoryStore", "MmapStore", "SLOW_STORES", "SegmentState", "Segmenter", "SentenceTier", "SentenceTierLayer",
           "SlowStore", "StepLog", "TierStats", "boundary_token_ids", "fit_mask", "segment", "tier_stats"]
