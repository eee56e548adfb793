"""A Hugging Face dataset (online, through `datasets`): ``hf:NAME[:CONFIG]:SPLIT:FIELD``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanlm.data.sources.base import DataContext, DataSource, register, tokenize_text
from leanlm.errors import LeanLMError


@register
@dataclass
class HFDatasetSource(DataSource):
    """One text column of a hub dataset split, rows joined by a blank line."""

    name = "hf"
    dataset: str = field(default="", metadata={"help": "hub dataset name, e.g. wikitext or org/name"})
    config: str | None = field(default=None, metadata={"help": "dataset configuration, e.g. wikitext-2-raw-v1"})
    split: str = field(default="train", metadata={"help": "split to read"})
    field: str = field(default="text", metadata={"help": "the column holding the text"})

    def label(self) -> str:
        return ":".join(["hf", self.dataset, *([self.config] if self.config else []), self.split, self.field])

    def check(self) -> None:
        if not self.dataset:
            raise LeanLMError("the hf data source needs a dataset name: hf:NAME[:CONFIG]:SPLIT:FIELD")

    def token_ids(self, ctx: DataContext) -> torch.Tensor:
        try:
            import datasets
        except ImportError:
            raise LeanLMError("hf data needs the `datasets` package (pip install 'leanlm[hub]')") from None
        try:
            rows = datasets.load_dataset(self.dataset, self.config, split=self.split)
        except Exception as err:  # offline, no such dataset or split: one sentence
            raise LeanLMError(f"could not load hub dataset '{self.dataset}' split '{self.split}' "
                              f"({type(err).__name__}; offline?)") from None
        if self.field not in rows.column_names:
            raise LeanLMError(f"hub dataset '{self.dataset}' has no field '{self.field}' "
                              f"(it has {', '.join(rows.column_names)})")
        self.__dict__["_read"] = {"rows": len(rows), "fingerprint": getattr(rows, "_fingerprint", None)}
        text = "\n\n".join(str(t) for t in rows[self.field])
        if not text.strip():
            raise LeanLMError(f"hub dataset '{self.dataset}' field '{self.field}' holds no text")
        return tokenize_text(ctx.tokenizer, text)

    def describe(self) -> dict:
        return {"source": self.name, "dataset": self.dataset, "config": self.config, "split": self.split,
                "field": self.field, **self.__dict__.get("_read", {}), "tokens": self.tokens_read()}
