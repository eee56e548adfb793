"""Evaluation texts beyond WikiText: any UTF-8 file, or a built-in out-of-domain novel by name.

    text, record = eval_text("pride")          # built-in: botchan, pride
    text, record = eval_text("notes/report.txt")

``record`` (name, path, sha256, source) goes into the perplexity ``protocol``; the token count is
added by the protocol that tokenizes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from leanlm.errors import LeanLMError


def _botchan() -> tuple[str, str, Path]:
    from leanlm.data.ood import SOURCE, ood_text
    from leanlm.models.loading import cache_root

    return ood_text(), SOURCE, cache_root() / "ood" / "botchan.txt"


def _pride() -> tuple[str, str, Path]:
    from leanlm.data.austen import SOURCE, pride_text
    from leanlm.models.loading import cache_root

    return pride_text(), SOURCE, cache_root() / "ood" / "pride_and_prejudice.txt"


BUILTIN_TEXTS: dict[str, Callable[[], tuple[str, str, Path]]] = {"botchan": _botchan, "pride": _pride}


def check_text(name: str) -> None:
    """Cheap check (no download, no read): a built-in name or an existing file."""
    if name not in BUILTIN_TEXTS and not Path(name).expanduser().is_file():
        raise LeanLMError(f"evaluation text '{name}' is neither a file nor a built-in text ({', '.join(BUILTIN_TEXTS)})")


def eval_text(name: str) -> tuple[str, dict]:
    """(text, record) of a built-in text or a UTF-8 file; LeanLMError for a missing, empty or binary file."""
    from leanlm.data.sources.file import read_utf8

    check_text(name)
    if name in BUILTIN_TEXTS:
        text, source, path = BUILTIN_TEXTS[name]()
        digest, of = hashlib.sha256(text.encode("utf-8")).hexdigest(), "the text scored (UTF-8)"
    else:
        path = Path(name).expanduser().resolve()
        text, source = read_utf8(path), "file"
        if not text.strip():
            raise LeanLMError(f"evaluation text '{name}' is empty")
        digest, of = hashlib.sha256(path.read_bytes()).hexdigest(), "the file's bytes (as sha256sum)"
    record = {"name": name if name in BUILTIN_TEXTS else Path(name).name, "path": str(path), "source": source,
              "sha256": digest, "sha256_of": of}
    return text, record


__all__ = ["BUILTIN_TEXTS", "check_text", "eval_text"]
