"""The user's own text: one UTF-8 file, every file under a directory, or the files a glob matches.

Files are read in sorted path order and joined with a blank line, then tokenized as one stream.
A missing path, an empty text, or a file that is not UTF-8 text (binary) is refused in one sentence.
"""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from leanlm.data.sources.base import DataContext, DataSource, register, tokenize_text
from leanlm.errors import LeanLMError

SNIFF_BYTES = 8192  # a NUL byte in a file's first 8 KiB marks it binary


def read_utf8(path: Path) -> str:
    """A file's text; LeanLMError for a binary or non-UTF-8 file."""
    data = path.read_bytes()
    if b"\x00" in data[:SNIFF_BYTES]:
        raise LeanLMError(f"'{path}' looks binary (it holds NUL bytes), not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LeanLMError(f"'{path}' is not UTF-8 text (byte {err.start} cannot be decoded)") from None


def expand_paths(spec: str) -> list[Path]:
    """A file, every regular non-hidden file under a directory, or a glob's matches; sorted; never empty."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise LeanLMError(f"directory '{path}' holds no files")
        return found
    if glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(str(Path(spec).expanduser()), recursive=True) if Path(p).is_file())
        if not found:
            raise LeanLMError(f"no file matches '{spec}'")
        return found
    raise LeanLMError(f"data file '{spec}' does not exist")


@register
@dataclass
class FileSource(DataSource):
    """UTF-8 text from a file, a directory (all files under it) or a glob (e.g. 'notes/*.md')."""

    name = "file"
    path: str = field(default="", metadata={"help": "a file, a directory or a glob pattern"})

    def label(self) -> str:
        return f"file:{self.path}"

    def check(self) -> None:
        if not self.path:
            raise LeanLMError("the file data source needs a path: file:PATH")
        expand_paths(self.path)

    def read(self) -> tuple[str, list[Path]]:
        paths = expand_paths(self.path)
        texts = [read_utf8(p) for p in paths]
        text = "\n\n".join(t.strip("\n") for t in texts)
        if not text.strip():
            raise LeanLMError(f"'{self.path}' holds no text (empty or whitespace only)")
        return text, paths

    def token_ids(self, ctx: DataContext) -> torch.Tensor:
        text, paths = self.read()
        self.__dict__["_read"] = {"files": len(paths), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                                  "chars": len(text)}
        return tokenize_text(ctx.tokenizer, text)

    def describe(self) -> dict:
        read = self.__dict__.get("_read", {})
        return {"source": self.name, "path": str(Path(self.path).expanduser().resolve()) if not glob.has_magic(self.path)
                else self.path, **read, "sha256_of": "the files' text joined by blank lines", "tokens": self.tokens_read()}
