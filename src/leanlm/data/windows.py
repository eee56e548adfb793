"""Token streams cut into what each room needs: perplexity windows, sentence chunks, calibration batches."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from leanlm.data.wikitext import wikitext_text
from leanlm.errors import LeanLMError


def tokenize_split(tokenizer, split: str, join: str = "raw") -> torch.Tensor:
    """The whole split as one 1-D LongTensor of token ids (no BOS: the text is one long stream)."""
    text = wikitext_text(split, join)
    # One long string: silence the 'longer than model max length' warning, we window it ourselves.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Window:
    """One forward pass of a perplexity protocol: ids[start:end], of which the last `scored` are scored."""

    start: int
    end: int
    scored: int  # how many of the window's next-token predictions count (at its end)


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows of up to `window` tokens whose ends move by `stride` (the HF perplexity recipe).

    The first window scores all its predictions; each later one scores only the `stride` targets
    after the previous window's end, with up to window - stride tokens of context. With
    stride < window every target token (positions 1..n-1) is scored exactly once; with
    stride == window the first token of each window has no context and is skipped, as in HF.
    """
    if not 0 < stride <= window:
        raise LeanLMError(f"stride must be in 1..window ({window}), got {stride}")
    if num_tokens < 2:
        raise LeanLMError("need at least 2 tokens to score a prediction")
    windows, prev_end = [], 1  # position 0 is never a target: nothing precedes it
    end = min(window, num_tokens)
    while True:
        start = max(0, end - window)
        first_target = max(prev_end, start + 1)
        windows.append(Window(start, end, end - first_target))
        if end >= num_tokens:
            return windows
        prev_end, end = end, min(end + stride, num_tokens)


def nonoverlapping_windows(num_tokens: int, window: int) -> list[Window]:
    """Back-to-back windows of `window` tokens, each scored fully, a partial tail dropped (GPTQ convention)."""
    if window < 2:
        raise LeanLMError(f"window must be at least 2 tokens, got {window}")
    count = num_tokens // window
    if count == 0:
        raise LeanLMError(f"the text has {num_tokens} tokens, fewer than one window of {window}")
    return [Window(i * window, (i + 1) * window, window - 1) for i in range(count)]


SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """Split on sentence ends and newlines, keeping each piece's leading whitespace with the next piece."""
    pieces, last = [], 0
    for match in SENTENCE_END.finditer(text):
        if match.start() > last:
            pieces.append(text[last : match.start()])
        last = match.start()
    if last < len(text):
        pieces.append(text[last:])
    return [p for p in pieces if p.strip()]


def sentence_chunks(token_ids_per_sentence: list[list[int]], max_tokens: int = 64) -> list[list[int]]:
    """Pack whole sentences into chunks of at most `max_tokens`; a longer sentence is cut into pieces.

    Every token lands in exactly one chunk, in order (concatenating the chunks gives the input back).
    """
    if max_tokens < 1:
        raise LeanLMError(f"max_tokens must be positive, got {max_tokens}")
    chunks: list[list[int]] = []
    current: list[int] = []
    for sentence in token_ids_per_sentence:
        if current and len(current) + len(sentence) > max_tokens:
            chunks.append(current)
            current = []
        for start in range(0, len(sentence), max_tokens):
            piece = sentence[start : start + max_tokens]
            if current and len(current) + len(piece) > max_tokens:
                chunks.append(current)
                current = []
            current = current + piece
    if current:
        chunks.append(current)
    return chunks


def wikitext_sentence_chunks(tokenizer, split: str, max_tokens: int = 64, limit: int | None = None) -> list[list[int]]:
    """Sentence-level chunks (~max_tokens each) of a WikiText-2 split, for sentence-level cache work."""
    sentences = split_sentences(wikitext_text(split))
    if limit is not None:
        sentences = sentences[:limit]
    ids = tokenizer(sentences, add_special_tokens=False)["input_ids"]
    return sentence_chunks(ids, max_tokens)


def calibration_batches(
    tokenizer, num_samples: int = 8, seq_len: int = 256, batch_size: int = 4, seed: int = 0, data=None,
    model: str | None = None, loaded=None,
) -> list[torch.Tensor]:
    """Random windows of the ``data`` setting (default: WikiText-2 *validation*, never test), as
    (batch, seq_len) LongTensors.

    ``data`` is a spec string, a recipe list or a ``DataMix`` (see ``leanlm.data.sources``);
    ``model`` / ``loaded`` name the original model for the ``teacher`` source. There is
    deliberately no ``split`` argument: calibration must not see the split we report on.
    """
    from leanlm.data.sources import DataContext, DataMix

    if num_samples < 1 or seq_len < 2 or batch_size < 1:
        raise LeanLMError("calibration needs num_samples >= 1, seq_len >= 2 and batch_size >= 1")
    samples = DataMix.parse(data).calibration(DataContext(tokenizer, model, loaded), num_samples, seq_len, seed)
    return list(samples.split(batch_size))  # each (batch, seq_len)
