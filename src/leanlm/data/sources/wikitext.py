"""WikiText-2 *validation* (the default calibration and distillation text; test is what we report on)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanlm.data.sources.base import DataContext, DataSource, register, tokenize_text
from leanlm.data.wikitext import split_source, wikitext_lines, wikitext_text
from leanlm.errors import LeanLMError


@register
@dataclass
class WikiTextSource(DataSource):
    """WikiText-2 raw validation, read as the file is (the stream calibration always used)."""

    name = "wikitext"
    split: str = field(default="validation", metadata={"help": "only validation: test is the split perplexity reports on"})

    def check(self) -> None:
        if self.split != "validation":
            raise LeanLMError(f"wikitext data reads the validation split only (got '{self.split}'): "
                              "test is what perplexity reports on, so nothing may train or calibrate on it")
        wikitext_lines(self.split)  # missing data fails here, before a model loads

    def token_ids(self, ctx: DataContext) -> torch.Tensor:
        return tokenize_text(ctx.tokenizer, wikitext_text(self.split))  # as tokenize_split(tokenizer, "validation")

    def describe(self) -> dict:
        record = split_source(self.split)
        origin = record.pop("source")
        return {"source": self.name, **record, "origin": origin, "tokens": self.tokens_read()}
