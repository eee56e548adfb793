"""Out-of-domain English text that nothing is trained on: *Botchan* (Natsume Soseki, tr. Morri).

Training on WikiText-2 validation also adapts a model to WikiText; perplexity on a different
text shows whether a gain is recovery or domain adaptation. The text is the Project Gutenberg
edition that the `sentencepiece` source distribution on PyPI ships as `test/botchan.txt`; we
fetch that sdist with pip (a package registry, reachable here and in CI) once and cache the file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.models.loading import cache_root

SDIST = "sentencepiece==0.2.1"
MEMBER = "sentencepiece-0.2.1/test/botchan.txt"
SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
SOURCE = f"PyPI sdist {SDIST}, file test/botchan.txt (Project Gutenberg EBook #8868, Botchan)"


def _fetch(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp, "-q"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        archives = list(Path(tmp).glob("sentencepiece-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise LeanLMError(f"could not download {SDIST} from PyPI for the out-of-domain text (offline?)")
        with tarfile.open(archives[0]) as archive:
            data = archive.extractfile(MEMBER).read()
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise LeanLMError(f"{MEMBER} from {SDIST} does not have the expected checksum")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = target.with_suffix(".tmp")
    tmp_file.write_bytes(data)
    os.replace(tmp_file, target)


def ood_text() -> str:
    """The novel's body, without the Project Gutenberg header and licence."""
    path = cache_root() / "ood" / "botchan.txt"
    if not path.is_file():
        _fetch(path)
    text = path.read_text(encoding="utf-8-sig")
    start = text.find("*** START OF")
    end = text.find("*** END OF")
    body = text[text.index("\n", start) + 1 : end] if start >= 0 and end > start else text
    return body.strip() + "\n"
