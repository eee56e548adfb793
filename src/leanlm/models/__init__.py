"""Models: loading (bundled GGUF, local directory, hub id), arch (family layouts), ModelSpec, tiny models."""

from leanlm.models.arch import ModelArch, arch_of, decoder_layers
from leanlm.models.loading import (
    BUNDLED,
    DEFAULT_MODEL,
    load_config,
    load_model,
    load_tokenizer,
    parse_dtype,
    strip_gguf_quantization,
)
from leanlm.models.spec import ModelSpec
from leanlm.models.tiny import tiny_gemma3, tiny_llama, tiny_model, tiny_qwen2

__all__ = [
    "BUNDLED",
    "DEFAULT_MODEL",
    "ModelArch",
    "ModelSpec",
    "arch_of",
    "decoder_layers",
    "load_config",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "strip_gguf_quantization",
    "tiny_gemma3",
    "tiny_llama",
    "tiny_model",
    "tiny_qwen2",
]
