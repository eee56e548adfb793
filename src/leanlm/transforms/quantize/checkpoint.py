"""Save and reload a weight-quantized model: safetensors of codes + scales, and a JSON naming the scheme.

Layout of a directory written by ``save_quantized``:
- ``config.json``: the model's stock transformers config (no quantization entry);
- ``quantization.json``: ``{"format": "leanlm-weight-quant", "scheme", "group_size", "layers",
  "layer_schemes" (each layer's scheme: an int8 head under int4 layers), ...}``;
- ``model.safetensors``: for each quantized Linear ``NAME``: ``NAME.qweight`` (int8 (out, in), or for
  int4 uint8 (out, in/2) with the even column in the low nibble), ``NAME.scales`` (int8: (out,);
  int4: (out, in/group)), int4 ``NAME.zeros`` (out, in/group), ``NAME.bias`` if any; every other
  tensor of the state dict as it is. int8 weight = qweight * scale; int4 = (q - 8) * scale + zero.
A tied input embedding is not stored: it is rebuilt from the quantized head at load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from leanlm.errors import LeanLMError
from leanlm.transforms.quantize import QuantizedEmbedding, QuantizedLinear, _set_module, quantization_of, scheme_class

FORMAT = "leanlm-weight-quant"
META = "quantization.json"
WEIGHTS = "model.safetensors"


def quantized_layers(model: torch.nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def save_quantized(model, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``model`` (quantized by ``quantize_weights``) to ``out_dir`` atomically (staged, then renamed)."""
    info = quantization_of(model)
    if info is None:
        raise LeanLMError("the model has no quantized layers: run quantize_weights first")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise LeanLMError(f"'{out_dir}' already exists; choose a new directory")
    layers = quantized_layers(model)
    tensors = {f"{name}.{key}": t.contiguous() for name, layer in layers.items() for key, t in layer.portable_state().items()}
    for key, t in model.state_dict().items():
        if not any(key.startswith(name + ".") for name in layers):
            tensors[key] = t.contiguous()
    embedding = model.get_input_embeddings()
    meta = {
        "format": FORMAT,
        "version": 1,
        **info,
        "layers": sorted(layers),
        "layer_schemes": {name: layer.scheme for name, layer in sorted(layers.items())},
        "tied_embedding_from": next((n for n, m in layers.items() if m is embedding.head[0]), None)
        if isinstance(embedding, QuantizedEmbedding) else None,
        "dtype": str(next(iter(layers.values())).scale_dtype()).removeprefix("torch."),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (stage / "config.json").write_text(json.dumps(config, indent=2))
        (stage / META).write_text(json.dumps(meta, indent=2))
        save_file(tensors, str(stage / WEIGHTS), metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def load_quantized(path: str | Path, dtype: torch.dtype | None = None):
    """Rebuild a model saved by ``save_quantized``; ``dtype`` (default: the saved one) for floats and scales."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        tensors = load_file(str(path / WEIGHTS))
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        raise LeanLMError(f"could not read the quantized checkpoint in '{path}': {err}") from err
    if meta.get("format") != FORMAT:
        raise LeanLMError(f"'{path / META}' is not a {FORMAT} file")
    schemes = meta.get("layer_schemes", {})  # per layer (e.g. an int8 head under int4 layers)
    dtype = dtype or getattr(torch, meta["dtype"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in meta["layers"]:
        prefix = f"{name}."
        # cloned: safetensors' buffers can sit at any byte offset, and ATen's packed int8 kernel segfaulted on
        # codes 8 bytes off a 64-byte boundary (an int8 head after int4 layers); fresh tensors are aligned
        state = {k[len(prefix):]: v.to(dtype, copy=True) if v.is_floating_point() else v.clone()
                 for k, v in tensors.items() if k.startswith(prefix)}
        _set_module(model, name, scheme_class(schemes.get(name, meta["scheme"])).from_state(state, meta["group_size"]))
    if meta.get("tied_embedding_from"):
        old = model.get_input_embeddings()
        model.set_input_embeddings(QuantizedEmbedding(model.get_submodule(meta["tied_embedding_from"]), old.padding_idx))
    rest = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()
            if not any(k.startswith(n + ".") for n in meta["layers"])}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if not any(k.startswith(n + ".") for n in meta["layers"])]
    if missing or unexpected:
        raise LeanLMError(f"the quantized checkpoint in '{path}' does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    _materialize_buffers(model, config)
    return model.eval()


def _materialize_buffers(model, config) -> None:
    """Non-persistent buffers (rotary inv_freq) were made on the meta device: rebuild their module on CPU."""
    for name, module in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                raise LeanLMError(f"cannot rebuild the buffers of {name} from the quantized checkpoint")
            _set_module(model, name, type(module)(config=module.config))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LeanLMError(f"the quantized checkpoint left tensors unset: {', '.join(left[:3])}")
