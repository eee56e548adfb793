"""Run directories that are never overwritten, atomic file writes, versions and git hash."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from leanlm.errors import LeanLMError


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_modes(root: Path) -> None:
    """Give files (0666) and folders (0777) under ``root`` the modes the umask allows.

    Temp files and folders (mkstemp, mkdtemp, and transformers' own temp writes) are private
    (0600/0700); renamed into place they would keep that, unlike every other output file.
    """
    root, mask = Path(root), _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def check_new_output(out: Path) -> None:
    """Results directories are never overwritten: refuse an existing non-empty one up front.

    Also checks that ``out`` can be created (its parent folder is made, and a staging folder is
    created and removed there), so an unwritable place fails before any work, in one sentence.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LeanLMError(f"output '{out}' already exists and is not empty; results are never overwritten, pick a new --out")
    blocking = next((p for p in out.absolute().parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise LeanLMError(f"cannot write the output '{out}': '{blocking}' is a file, not a folder; pick another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)).rmdir()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise LeanLMError(f"cannot write the output '{out}' ({reason}); pick another --out") from None


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a hidden staging folder beside `out`; rename it to `out` only when the block succeeds.

    An interrupted or failed run leaves nothing half-written at `out`.
    """
    out = Path(out)
    check_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield stage
        check_new_output(out)  # someone may have created it meanwhile
        ordinary_modes(stage)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def versions() -> dict:
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("leanlm", "torch", "transformers", "accelerate", "peft", "gguf"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_info() -> dict:
    """Commit of the leanlm checkout that produced a result (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[3]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}
