"""Activation-aware scale search for int4 weights (the scale search of AWQ, Lin et al. 2023), simplified.

Input channels that carry large activations matter more. For each Linear, with ``a`` the mean |x|
of each input channel on calibration text (WikiText-2 *validation*), try ``s = a ** alpha`` for a few
alphas (alpha = 0 is plain round-to-nearest), quantize ``W * diag(s)`` and keep the alpha whose
output ``X W_hat^T`` is closest to ``X W^T`` on sampled calibration inputs X. The layer then holds
``input_scale = 1 / s`` and multiplies its input by it (one (in,) vector per layer, counted in the
bytes). Unlike AWQ we do not fold the scales into the previous layer, and inputs come from the float
model (not the partly quantized one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from leanlm.models.widen import widened_linears
from leanlm.transforms.quantize.int4 import dequantize_groups, quantize_groups


@dataclass
class ScaleSearchConfig:
    alphas: tuple[float, ...] = field(default=(0.0, 0.25, 0.5, 0.75, 1.0), metadata={"help": "exponents tried; 0 = plain RTN"})
    sample_tokens: int = field(default=256, metadata={"help": "calibration inputs kept per layer to score an alpha"})


@torch.no_grad()
def collect_inputs(model: nn.Module, calibration: list[torch.Tensor], sample_tokens: int) -> dict[str, tuple]:
    """Per nn.Linear: (mean |x| per input channel (in,), a sample of inputs (tokens, in), float32)."""
    stats, hooks = {}, []

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            total, count, kept = stats.get(name, (0.0, 0, []))
            have = sum(len(k) for k in kept)
            if have < sample_tokens:
                step = max(1, len(x) // (sample_tokens - have))
                kept = kept + [x[::step][: sample_tokens - have]]
            stats[name] = (total + x.abs().sum(0), count + len(x), kept)
        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        with widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones (the hooks see bf16 inputs)
            for batch in calibration:
                model(batch.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {name: (total / count, torch.cat(kept)) for name, (total, count, kept) in stats.items()}


@torch.no_grad()
def search_input_scale(weight: torch.Tensor, mean_abs: torch.Tensor, x: torch.Tensor, group_size: int,
                       config: ScaleSearchConfig) -> tuple[torch.Tensor | None, dict]:
    """The best ``input_scale`` (in,) for one layer (None when plain RTN wins) and the error of each alpha."""
    w = weight.float()  # (out, in)
    ref = x @ w.T  # (tokens, out)
    errors, best = {}, (math.inf, None)
    for alpha in config.alphas:
        s = mean_abs.clamp_min(1e-5) ** alpha  # (in,)
        s = s / (s.max() * s.min()).sqrt()  # centred in log scale, as AWQ does
        s = s.to(weight.dtype).float()  # the rounding the layer will hold (as 1 / input_scale)
        codes, scale, zero = quantize_groups((w * s).to(weight.dtype), group_size)
        w_hat = dequantize_groups(codes, scale, zero, group_size) / s  # (out, in)
        err = ((x @ w_hat.T - ref) ** 2).mean().item()
        errors[alpha] = err
        if err < best[0]:
            best = (err, None if alpha == 0 else 1 / s)
    return best[1], errors


def search_scales(model: nn.Module, layers: dict[str, nn.Linear], calibration: list[torch.Tensor], group_size: int,
                  config: ScaleSearchConfig) -> tuple[dict[str, torch.Tensor | None], dict[str, float]]:
    """``input_scale`` (or None) and the chosen alpha of every layer, from one calibration pass."""
    inputs = collect_inputs(model, calibration, config.sample_tokens)
    scales, alphas = {}, {}
    for name, linear in layers.items():
        mean_abs, sample = inputs[name]
        scales[name], errors = search_input_scale(linear.weight, mean_abs, sample, group_size, config)
        alphas[name] = min(errors, key=errors.get)
    return scales, alphas
