"""WikiText-2 raw splits: found in LEANLM_DATA_DIR, then ../shared/data, then HF `datasets` online.

Calibration and distillation read *validation*; perplexity is reported on *test*.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from leanlm.errors import LeanLMError

SPLITS = {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}
DATA_ENV = "LEANLM_DATA_DIR"


def _candidate_dirs() -> list[Path]:
    """Where to look: the setting alone when it is set (the user named a place), else ../shared/data
    beside the checkout or the cwd."""
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV]).expanduser()]
    dirs = []
    repo_root = Path(__file__).resolve().parents[3]  # src/leanlm/data/wikitext.py -> checkout root
    dirs += [repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return dirs


def find_split_file(split: str) -> Path | None:
    """The raw file of a split, if it is on disk (layout DIR/wikitext-2-raw/FILE or DIR/FILE)."""
    name = SPLITS[split]
    for base in _candidate_dirs():
        for path in (base / "wikitext-2-raw" / name, base / name):
            if path.is_file():
                return path
    return None


def _lines_from_hub(split: str) -> list[str] | None:
    try:
        import datasets  # optional extra `hub`
    except ImportError:
        return None
    try:
        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception:  # offline, hub down, ...: fall through to the clear error below
        return None
    return list(rows)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise LeanLMError(f"unknown WikiText-2 split '{split}': choose one of {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=4)
def wikitext_lines(split: str) -> tuple[str, ...]:
    """The split as the rows of HF `wikitext-2-raw-v1`: each line with its newline, blank lines as ''."""
    check_split(split)
    path = find_split_file(split)
    if path is not None:
        raw = path.read_text(encoding="utf-8").splitlines(keepends=True)
        # The HF loader yields a blank ('' ) row for whitespace-only lines: match it exactly.
        return tuple(line if line.strip() else "" for line in raw)
    if os.environ.get(DATA_ENV):
        named = Path(os.environ[DATA_ENV]).expanduser()
        raise LeanLMError(f"WikiText-2 '{split}' not found: {DATA_ENV} is set to '{named}', which holds neither wikitext-2-raw/{SPLITS[split]} nor "
                          f"{SPLITS[split]}; put the file there, or unset {DATA_ENV} to use ../shared/data")
    rows = _lines_from_hub(split)
    if rows is not None:
        return tuple(rows)
    searched = ", ".join(str(d) for d in _candidate_dirs()) or "(none)"
    raise LeanLMError(
        f"WikiText-2 '{split}' not found: set {DATA_ENV} to a folder holding wikitext-2-raw/{SPLITS[split]}, "
        f"or put it in ../shared/data (looked in {searched}), or install `datasets` and go online"
    )


def split_source(split: str) -> dict:
    """Where a split was read from: the file and its sha256, or the HF dataset (recorded in results.json)."""
    import hashlib

    path = find_split_file(split)
    if path is None:
        return {"split": split, "source": "huggingface datasets: wikitext/wikitext-2-raw-v1", "path": None, "sha256": None}
    return {"split": split, "source": "file", "path": str(path.resolve()),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def wikitext_text(split: str, join: str = "raw") -> str:
    """The split as one string.

    join='raw': the file as it is (what llama.cpp-style perplexity reads).
    join='paper': rows joined with "\\n\\n", the convention of GPTQ, SparseGPT, LLM-Pruner and Wanda.
    """
    lines = wikitext_lines(split)
    if join == "raw":
        path = find_split_file(split)
        return path.read_text(encoding="utf-8") if path else "".join(lines)
    if join == "paper":
        return "\n\n".join(lines)
    raise LeanLMError(f"unknown join '{join}': choose 'raw' or 'paper'")
