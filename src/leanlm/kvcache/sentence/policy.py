"""``SentenceTier``: the registered ``sentence_tier`` policy — settings, sizing for a budget, hooks."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import CachePolicy, PolicyCache, check_budget
from leanlm.kvcache.sentence.coarse import CoarseMap, CoarseMaps
from leanlm.kvcache.sentence.hooks import feed_token_ids, select_and_fit_mask
from leanlm.kvcache.sentence.index import SemanticIndex, minilm_installed, shared_encoder
from leanlm.kvcache.sentence.layer import SentenceTierLayer
from leanlm.kvcache.sentence.segment import Segmenter, boundary_token_ids
from leanlm.kvcache.sentence.stores import SLOW_STORES, MemoryStore, MmapStore
from leanlm.models.arch import arch_of

log = logging.getLogger("leanlm")



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
    budget_tokens: float | None = None  # fast-tier size per layer in tokens' K/V (for_budget sets it): retrieved
    # sentences fill what the sinks, open sentence, summaries and index really held leave of it, each step

    def __post_init__(self):
        if self.budget_tokens is not None and self.budget_tokens < 0:
            raise LeanLMError(f"sentence_tier budget_tokens must be >= 0, got {self.budget_tokens}")
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
                                 recent_share=self.recent_share, budget_tokens=self.budget_tokens)

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
            next(layer for layer in cache.layers if isinstance(layer, SentenceTierLayer)).count_index = True
        feed = lambda module, args, kwargs: feed_token_ids(module, args, kwargs, cache, segmenter, index)  # noqa: E731
        arch = arch_of(model)
        handles = [arch.body.register_forward_pre_hook(feed, with_kwargs=True)]  # the base model sees the ids
        select = lambda module, args, kwargs: select_and_fit_mask(module, args, kwargs, cache)  # noqa: E731
        for view in arch.attentions():
            if isinstance(cache.layers[view.index], SentenceTierLayer):  # not the model's own sliding windows
                handles.append(view.module.register_forward_pre_hook(select, with_kwargs=True))
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

    @classmethod
    def for_budget(cls, budget: float, context: int, **settings) -> SentenceTier:
        """A fast tier of ``budget`` × the full cache of ``context`` tokens, filled from what it really holds.

        ``budget_tokens = budget × context``: each layer gives its retrieved sentences what its sinks,
        open sentence, summaries (and the index, in layer 0) actually held leave of that many tokens' K/V,
        recomputed as sentences close (``SentenceTierLayer.room``), so the fast tier stays within the
        budget and close to it whatever the text's sentence lengths; B (a count of sentences) does not
        bind. Below sinks + one maximal open sentence the budget may leave no room: a warning says so.
        At budget 1, B = ``context``: every sentence can be retrieved (the exact reference; its fast
        tier holds the summaries on top of the full cache). ``group`` (the quantization group other
        policies take) is ignored: SentenceKV keeps K/V in full precision.
        """
        check_budget(budget)
        settings.pop("group", None)
        settings.pop("head_dim", None)  # sized in tokens (K and V both full precision): head_dim cancels
        if settings.get("bits") is not None:
            raise LeanLMError("sentence_tier keeps K/V in full precision: it does not combine with +int8/+int4/+int2")
        settings.pop("bits", None)
        tokenizer = settings.pop("tokenizer", None)
        with_tokenizer = lambda p: p.use_tokenizer(tokenizer) if tokenizer is not None else p  # noqa: E731
        policy = with_tokenizer(cls(**settings))
        if budget >= 1:
            return with_tokenizer(replace(policy, retrieve=max(1, context)))
        if budget * context <= policy.sink + policy.max_sentence:  # legal, but maybe only sinks + open sentence
            warn_no_room(budget, context)
        return with_tokenizer(replace(policy, retrieve=max(1, context), budget_tokens=budget * context))

    def describe(self) -> dict:
        described = super().describe()
        described["boundaries"] = "length only" if self.boundary_table is None else "tokenizer table"
        described["index"] = self.resolved_index
        return described


@functools.lru_cache(maxsize=None)  # once per setting: a protocol sizes a policy for every window
def warn_no_room(budget: float, context: int) -> None:
    log.warning("sentence_tier: a budget of %g x %d tokens may leave no room to fetch sentences (sinks + a "
                "maximal open sentence fill it); raise the budget or the context, or lower max_sentence", budget, context)
