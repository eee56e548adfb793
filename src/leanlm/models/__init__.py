"""Models: loading (bundled GGUF, local directory, hub id), arch (family layouts), ModelSpec, tiny models."""

from leanlm.models.arch import ModelArch, arch_of, decoder_layers
from leanlm.models.device import DEVICES, model_device, resolve_device, synced_clock, synchronize
from leanlm.models.loading import (
    BUNDLED,
    DEFAULT_MODEL,
    load_config,
    load_model,
    load_tokenizer,
)
from leanlm.models.spec import ModelSpec
from leanlm.models.tiny import tiny_gemma3, tiny_llama, tiny_model, tiny_qwen2
from leanlm.models.weights import param_count, parse_dtype, strip_gguf_quantization

__all__ = [
    "BUNDLED",
    "DEVICES",
    "DEFAULT_MODEL",
    "ModelArch",
    "ModelSpec",
    "arch_of",
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
    "tiny_gemma3",
    "tiny_llama",
    "tiny_model",
    "tiny_qwen2",
]
