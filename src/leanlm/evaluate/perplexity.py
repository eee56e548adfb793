"""Perplexity on WikiText-2 (or any text: ``text=`` a file or a built-in novel) with an explicit, recorded protocol.

Two named protocols, so our numbers can sit beside others':
- ``sliding``: the file as it is, windows of `window` tokens moved by `stride`; each token is
  scored once with up to window - stride tokens of context (the HF perplexity recipe).
- ``nonoverlap``: rows joined with "\\n\\n" and cut into back-to-back windows (GPTQ, SparseGPT,
  Wanda, LLM-Pruner convention; they use window 2048, LLM-Pruner 128), a partial tail dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from leanlm.data import nonoverlapping_windows, sliding_windows, tokenize_split
from leanlm.data.ood import SOURCE as OOD_SOURCE
from leanlm.data.texts import check_text, eval_text
from leanlm.data.wikitext import check_split
from leanlm.data.windows import Window
from leanlm.errors import LeanLMError
from leanlm.models.widen import widened_linears

METHODS = ("sliding", "nonoverlap")
OOD_SPLIT = "botchan"  # out-of-domain English text, see leanlm.data.ood


@dataclass
class PerplexityProtocol:
    """What is scored and how; recorded next to every perplexity leanlm reports."""

    split: str = field(default="test", metadata={"help": "WikiText-2 split to report on, or 'botchan' (out of domain)"})
    method: str = field(default="sliding", metadata={"help": "sliding | nonoverlap"})
    window: int = field(default=1024, metadata={"help": "tokens per forward pass"})
    stride: int = field(default=512, metadata={"help": "sliding only: tokens the window moves"})
    max_tokens: int | None = field(default=16384, metadata={"help": "first N tokens of the split; None = all"})
    text: str | None = field(default=None, metadata={"help": "score this instead of WikiText: a UTF-8 file or a "
                                                              "built-in text (botchan, pride)"})

    def validate(self) -> None:
        if self.text is not None:
            check_text(self.text)
        elif self.split != OOD_SPLIT:
            check_split(self.split)
        if self.method not in METHODS:
            raise LeanLMError(f"unknown perplexity method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.window < 2:
            raise LeanLMError(f"window must be at least 2 tokens, got {self.window}")
        if self.method == "sliding" and not 0 < self.stride <= self.window:
            raise LeanLMError(f"stride must be between 1 and the window ({self.window}), got {self.stride}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise LeanLMError(f"max tokens must be at least 2 (or 'all'), got {self.max_tokens}")

    @property
    def text_name(self) -> str | None:
        """The evaluation text scored instead of a WikiText split (``split='botchan'`` is the text botchan)."""
        return self.text if self.text is not None else (OOD_SPLIT if self.split == OOD_SPLIT else None)

    @property
    def label(self) -> str:
        return self.text_name or self.split

    @property
    def join(self) -> str:
        return "raw" if self.method == "sliding" else "paper"

    def windows(self, num_tokens: int) -> list[Window]:
        if self.method == "sliding":
            return sliding_windows(num_tokens, self.window, self.stride)
        return nonoverlapping_windows(num_tokens, self.window)


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    window_nll: list[float]  # mean NLL of each window, in order (for plots)
    protocol: dict  # the PerplexityProtocol plus dtype, join, tokens used and windows
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_nll(model, ids: torch.Tensor, windows: list[Window], desc: str = "perplexity") -> tuple[float, int, list[float]]:
    """Sum of next-token NLL over the scored positions of each window; returns (sum, count, per-window means)."""
    total, count, per_window = 0.0, 0, []
    device = next(model.parameters()).device
    with torch.inference_mode(), widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones
        for win in tqdm(windows, desc=desc, unit="win", leave=False):
            chunk = ids[win.start : win.end].unsqueeze(0).to(device)  # (1, L)
            # Only the scored positions need logits: keep scored + 1 and drop the last (it predicts past the window).
            logits = model(chunk, use_cache=False, logits_to_keep=win.scored + 1).logits[0, :-1]  # (scored, vocab)
            targets = chunk[0, -win.scored :]
            nll = F.cross_entropy(logits.float(), targets, reduction="sum").item()  # float32 loss whatever the model dtype
            total += nll
            count += win.scored
            per_window.append(nll / win.scored)
    return total, count, per_window


def _protocol_ids(tokenizer, protocol: PerplexityProtocol) -> tuple[torch.Tensor, dict | None]:
    """The token stream scored, and the text's record (name, path, sha256, tokens) when it is not WikiText."""
    if protocol.text_name is None:
        return tokenize_split(tokenizer, protocol.split, protocol.join), None
    text, record = eval_text(protocol.text_name)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    return ids, record | {"tokens": len(ids)}


def perplexity(model, tokenizer, protocol: PerplexityProtocol | None = None) -> PerplexityResult:
    """Perplexity of `model` on WikiText-2 under `protocol` (run in the model's own dtype)."""
    protocol = protocol or PerplexityProtocol()
    protocol.validate()
    ids, text_record = _protocol_ids(tokenizer, protocol)
    if protocol.max_tokens is not None:
        ids = ids[: protocol.max_tokens]
    windows = protocol.windows(len(ids))
    start = time.perf_counter()
    total, count, per_window = token_nll(model, ids, windows, desc=f"perplexity ({protocol.label})")
    mean = total / count
    record = asdict(protocol) | {
        "dtype": str(model.dtype).removeprefix("torch."),
        "join": protocol.join,
        "tokens_in_split_used": len(ids),
        "num_windows": len(windows),
        "tokens_scored": count,
        "bos": False,
    }
    if text_record is not None:
        record["text"] = text_record
    if protocol.text is not None:  # not a WikiText split
        record["split"] = None
    if protocol.text_name == OOD_SPLIT:
        record["text_source"] = OOD_SOURCE
    return PerplexityResult(math.exp(mean), mean, count, per_window, record, time.perf_counter() - start)
