"""JSON Lines: one JSON object per line, the text in one field (``jsonl:PATH:FIELD``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanlm.data.sources.base import DataContext, DataSource, register, tokenize_text
from leanlm.data.sources.file import read_utf8
from leanlm.errors import LeanLMError


@register
@dataclass
class JsonlSource(DataSource):
    """The ``field`` of every object of a JSONL file; records joined by a blank line. Blank lines are skipped."""

    name = "jsonl"
    path: str = field(default="", metadata={"help": "the .jsonl file"})
    field: str = field(default="text", metadata={"help": "the key holding each record's text"})

    def label(self) -> str:
        return f"jsonl:{self.path}:{self.field}"

    def check(self) -> None:
        if not self.path:
            raise LeanLMError("the jsonl data source needs a path: jsonl:PATH:FIELD")
        if not Path(self.path).expanduser().is_file():
            raise LeanLMError(f"JSONL file '{self.path}' does not exist")

    def records(self) -> list[str]:
        path = Path(self.path).expanduser()
        self.check()
        texts = []
        for number, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise LeanLMError(f"'{path}' line {number} is not valid JSON") from None
            if not isinstance(record, dict) or self.field not in record:
                raise LeanLMError(f"'{path}' line {number} has no field '{self.field}'")
            if not isinstance(record[self.field], str):
                raise LeanLMError(f"'{path}' line {number}: field '{self.field}' is not a string")
            texts.append(record[self.field])
        if not "".join(texts).strip():
            raise LeanLMError(f"'{path}' holds no text in field '{self.field}'")
        return texts

    def token_ids(self, ctx: DataContext) -> torch.Tensor:
        texts = self.records()
        path = Path(self.path).expanduser()
        self.__dict__["_read"] = {"records": len(texts), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        return tokenize_text(ctx.tokenizer, "\n\n".join(texts))

    def describe(self) -> dict:
        return {"source": self.name, "path": str(Path(self.path).expanduser().resolve()), "field": self.field,
                **self.__dict__.get("_read", {}), "tokens": self.tokens_read()}
