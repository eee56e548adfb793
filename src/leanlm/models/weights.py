"""Plain facts and edits of a loaded model's weights: dtype names, GGUF bookkeeping, parameter counts,
resizing a Linear. A leaf module (torch and transformers only): loading, the compact format, transforms and
evaluation all build on it without importing each other."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from leanlm.errors import LeanLMError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters counted once even when shared (tied embeddings share one tensor)."""
    seen, params = set(), []
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            params.append(param)
    return params


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(model))


def tensors_held(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer the module holds, each storage once (tied weights share one)."""
    seen, out = set(), []
    for tensor in [*module.parameters(), *module.buffers()]:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            out.append(tensor)
    return out


def held_bytes(module: nn.Module) -> int:
    """Bytes of all parameters and buffers held (each storage once)."""
    return sum(t.numel() * t.element_size() for t in tensors_held(module))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights as saved: parameters and persistent buffers (quantized layers keep their codes and
    scales in buffers), each storage once; run-time tables such as RoPE's inverse frequencies are not weights."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def resize_linear(linear: nn.Linear, out_features: int, in_features: int) -> None:
    """Give a Linear uninitialized weights of a new shape (the loader fills them from a checkpoint)."""
    w = linear.weight
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=w.dtype, device=w.device))
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.empty(out_features, dtype=w.dtype, device=w.device))
    linear.out_features, linear.in_features = out_features, in_features
