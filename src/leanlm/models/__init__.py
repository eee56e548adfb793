"""Models: loading (bundled GGUF, local directory, hub id), ModelSpec, tiny random models."""

from leanlm.models.device import DEVICES, model_device, resolve_device, synced_clock, synchronize
from leanlm.models.loading import (
    BUNDLED,
    DEFAULT_MODEL,
    load_config,
    load_model,
    load_tokenizer,
)
from leanlm.models.spec import ModelSpec, decoder_layers
from leanlm.models.tiny import tiny_llama
from leanlm.models.weights import param_count, parse_dtype, strip_gguf_quantization

__all__ = [
    "BUNDLED",
    "DEVICES",
    "DEFAULT_MODEL",
    "ModelSpec",
    "decoder_layers",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_device",
    "param_count",
    "parse_dtype",
    "resolve_device",
    "strip_gguf_quantization",
    "synced_clock",
    "synchronize",
    "tiny_llama",
]
