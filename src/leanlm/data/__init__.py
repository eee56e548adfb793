"""Data: WikiText-2 raw splits, token windows, sentence chunks, calibration batches (validation only)."""

from leanlm.data.wikitext import SPLITS, find_split_file, wikitext_lines, wikitext_text
from leanlm.data.windows import (
    Window,
    calibration_batches,
    nonoverlapping_windows,
    sentence_chunks,
    sliding_windows,
    split_sentences,
    tokenize_split,
    wikitext_sentence_chunks,
)

__all__ = [
    "SPLITS",
    "Window",
    "calibration_batches",
    "find_split_file",
    "nonoverlapping_windows",
    "sentence_chunks",
    "sliding_windows",
    "split_sentences",
    "tokenize_split",
    "wikitext_lines",
    "wikitext_sentence_chunks",
    "wikitext_text",
]
