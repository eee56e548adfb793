"""*Pride and Prejudice* (Jane Austen) as out-of-domain English text, from Debian's `r-cran-janeaustenr`.

The package holds the novels as an R lazy-load database (``data/Rdata.rdx`` index + ``Rdata.rdb``
zlib-compressed serialized objects); the PyPI package ``rdata`` parses the R serialization. The .deb
is fetched once over HTTP from the Debian archive (or with ``apt-get download`` when that fails), the
novel's lines are joined with newlines, checked against a pinned sha256 and cached.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.models.loading import cache_root

PACKAGE = "r-cran-janeaustenr"
DEB_URL = "http://deb.debian.org/debian/pool/main/r/r-cran-janeaustenr/r-cran-janeaustenr_1.0.0-1_all.deb"
DATA_DIR = "./usr/lib/R/site-library/janeaustenr/data/"
TEXT_SHA256 = "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d"
SOURCE = f"Debian package {PACKAGE} 1.0.0-1 (janeaustenr::prideprejudice, read with rdata)"


def _deb_bytes() -> bytes:
    try:
        with urllib.request.urlopen(DEB_URL, timeout=60) as response:
            return response.read()
    except OSError:
        pass
    with tempfile.TemporaryDirectory() as tmp:  # the machine's own apt sources, if any
        done = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, timeout=300)
        debs = list(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or not debs:
            raise LeanLMError(f"could not download {PACKAGE} from the Debian archive for Pride and Prejudice (offline?)")
        return debs[0].read_bytes()


def _ar_member(archive: bytes, prefix: str) -> bytes:
    """The first member of an ar archive (a .deb) whose name starts with ``prefix``."""
    if not archive.startswith(b"!<arch>\n"):
        raise LeanLMError(f"the {PACKAGE} download is not a .deb archive")
    offset = 8
    while offset + 60 <= len(archive):
        header = archive[offset : offset + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        if name.startswith(prefix):
            return archive[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
    raise LeanLMError(f"the {PACKAGE} .deb holds no {prefix}*")


def novel_lines(deb: bytes, variable: str = "prideprejudice") -> list[str]:
    """The lines of one novel (a character vector in the package's lazy-load data) from the .deb bytes."""
    import rdata  # only needed here

    data = _ar_member(deb, "data.tar")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        index, database = (tar.extractfile(DATA_DIR + name).read() for name in ("Rdata.rdx", "Rdata.rdb"))
    with warnings.catch_warnings():  # rdata warns that a bare serialization is "assumed RDS": it is
        warnings.simplefilter("ignore", UserWarning)
        variables = rdata.conversion.convert(rdata.parser.parse_data(index))["variables"]
        offset, length = (int(x) for x in variables[variable])
        chunk = database[offset : offset + length]  # 4-byte big-endian length, then a zlib stream
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
    return [str(line) for line in lines]


def pride_text() -> str:
    """The novel as one string (lines joined by newlines), fetched once and cached; sha256 checked."""
    path = cache_root() / "ood" / "pride_and_prejudice.txt"
    if not path.is_file():
        text = "\n".join(novel_lines(_deb_bytes())) + "\n"
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != TEXT_SHA256:
            raise LeanLMError(f"Pride and Prejudice from {PACKAGE} does not have the expected checksum")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path.read_text(encoding="utf-8")


__all__ = ["SOURCE", "novel_lines", "pride_text"]
