"""Weight-only quantization (int8 per channel, int4 group-wise) of every Linear, output head included.

``quantize_weights(model, "int8" | "int4", group_size)`` replaces the model's ``nn.Linear`` layers
in place by modules that hold integer codes + scales and multiply with packed-weight CPU kernels
(leanlm's own for decode, ATen's int8 GEMM for longer inputs), and returns a JSON-able report. A tied input embedding is replaced by one that reads its
rows from the quantized head, so the two stay one tensor (and are counted once).
"""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from leanlm.errors import LeanLMError
from leanlm.transforms.quantize.base import (
    SCHEMES,
    QuantizedEmbedding,
    QuantizedLinear,
    held_bytes,
    scheme_class,
    tensors_held,
)
from leanlm.transforms.base import check_calibration
from leanlm.transforms.quantize.awq import ScaleSearchConfig, search_scales
from leanlm.transforms.quantize.int4 import Int4Linear
from leanlm.transforms.quantize.int8 import Int8Linear


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _is_tied(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    return isinstance(emb, nn.Embedding) and isinstance(head, nn.Linear) and emb.weight.data_ptr() == head.weight.data_ptr()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def check_scheme(model: nn.Module, scheme: str, group_size: int, head: str | None = None) -> type[QuantizedLinear]:
    """The scheme's class, after checking every Linear can take it, the output head ``head`` if given (one
    LeanLMError otherwise)."""
    cls = scheme_class(scheme)
    layers = linear_layers(model)
    if not layers:
        raise LeanLMError("the model has no nn.Linear layers to quantize (already quantized?)")
    for name, linear in layers.items():
        layer_cls = scheme_class(head) if head is not None and linear is model.get_output_embeddings() else cls
        why = layer_cls.check(linear.in_features, linear.out_features, group_size)
        if why:
            raise LeanLMError(f"cannot quantize {name}: {why}")
    return cls


def quantize_weights(model: nn.Module, scheme: str, group_size: int = 128, calibration: list | None = None,
                     search: ScaleSearchConfig | None = None, head: str | None = None) -> dict:
    """Quantize every nn.Linear of ``model`` in place (attention, MLP, output head); return a report.

    int8: symmetric, one scale per output channel (``group_size`` does not apply). int4: asymmetric,
    one scale and zero per ``group_size`` inputs (32, 64, 128 or 256; it must divide every layer's
    in_features: SmolLM2's 576 takes 32 or 64). Scales keep the weights' dtype. The report counts
    the bytes of every parameter and buffer held before and after (each storage once).
    ``calibration`` ((batch, seq) token ids of WikiText-2 validation): int4 only, an activation-aware
    scale search per layer (awq.py) instead of plain round-to-nearest. ``head``: another scheme for the
    output head (and so a tied input embedding), e.g. int8 under int4 layers, as llama.cpp's quantizer keeps
    the output / tied embedding tensor at 6 bits under 4-bit layers; default: ``scheme``.
    """
    cls = check_scheme(model, scheme, group_size, head)
    head_cls = scheme_class(head) if head is not None else cls
    if head_cls.bits < cls.bits:  # (one group size is recorded per checkpoint, and int8 layers record none)
        raise LeanLMError(f"the output head can be kept at more bits than the layers, not fewer ({head} under {scheme})")
    if calibration is not None and cls.bits != 4:
        raise LeanLMError("the activation-aware scale search (calibration) applies to int4 only")
    scales, alphas = {}, {}
    if calibration is not None:
        search = search or ScaleSearchConfig()
        calibration = check_calibration(calibration, "the int4 scale search")
        searched = {n: m for n, m in linear_layers(model).items() if m is not model.get_output_embeddings() or head_cls.bits == 4}
        scales, alphas = search_scales(model, searched, calibration, group_size, search)
    before = held_bytes(model)
    tied = _is_tied(model)
    layers = linear_layers(model)
    output_name = next((n for n, m in layers.items() if m is model.get_output_embeddings()), None)
    for name, linear in layers.items():
        layer_cls = head_cls if name == output_name else cls
        extra = {"input_scale": scales[name]} if scales.get(name) is not None else {}
        _set_module(model, name, layer_cls.from_float(linear.weight, linear.bias, group_size, **extra))
    if tied:  # the embedding reads the quantized head's rows; the float table is dropped
        old = model.get_input_embeddings()
        model.set_input_embeddings(QuantizedEmbedding(model.get_submodule(output_name), old.padding_idx))
    after = held_bytes(model)
    return {
        "scheme": scheme,
        "head_scheme": head_cls.scheme,
        "group_size": group_size if cls.bits == 4 else None,
        "layers_quantized": len(layers),
        "layer_names": sorted(layers),
        "tied_embedding_shared": tied,
        "weight_bytes_before": before,
        "weight_bytes_after": after,
        "bytes_ratio": before / after,
        "scale_search": None if calibration is None else {
            "calibration_tokens": sum(b.numel() for b in calibration), **asdict(search),
            "alpha_counts": {str(a): sum(v == a for v in alphas.values()) for a in search.alphas},
        },
    }


def quantization_of(model: nn.Module) -> dict | None:
    """{scheme, group_size, head_scheme} of a model quantized by quantize_weights, or None for a float model."""
    head = model.get_output_embeddings()
    for m in model.modules():
        if isinstance(m, QuantizedLinear) and m is not head:
            return {"scheme": m.scheme, "group_size": m.group_size,
                    "head_scheme": head.scheme if isinstance(head, QuantizedLinear) else None}
    return None


__all__ = [
    "SCHEMES",
    "Int4Linear",
    "Int8Linear",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "ScaleSearchConfig",
    "check_scheme",
    "held_bytes",
    "linear_layers",
    "quantization_of",
    "quantize_weights",
    "tensors_held",
]
