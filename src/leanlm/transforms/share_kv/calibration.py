"""Second moments of each layer's attention input, the only statistic the calibrated merge needs.

Keys, queries and values are linear in the attention input ``x`` (after the layer's input norm), so
``C = E[x x^T]`` prices any error of a k/q/v projection: ``E|(W - W') x|^2 = tr((W - W') C (W - W')^T)``.
A model with q/k/v biases (Qwen2) appends a constant 1 to ``x`` (the "augmented" input), so a bias is
one more column of the weight. One forward pass over the calibration batches on the model as it is;
every layer sees the original activations (layers are merged independently, not one after another).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from leanlm.models import arch_of
from leanlm.recover.layer_local import attention_input_pass


def has_bias(view) -> bool:
    """Whether any of q/k/v carries a bias (then weights and inputs are handled augmented)."""
    return any(proj.bias is not None for proj in (view.q_proj, view.k_proj, view.v_proj))


def augmented_weight(linear: nn.Linear, augmented: bool) -> torch.Tensor:
    """``[W | b]`` in float64 (out, in + 1), or ``W`` (out, in) when not augmented."""
    weight = linear.weight.detach().double()
    if not augmented:
        return weight
    bias = linear.bias.detach().double() if linear.bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, bias[:, None]], dim=1)


def set_augmented_weight(linear: nn.Linear, weight: torch.Tensor, augmented: bool) -> None:
    """Give ``linear`` the weight (and bias, from the last column when augmented) of ``weight``."""
    dtype, device = linear.weight.dtype, linear.weight.device
    matrix = weight[:, :-1] if augmented else weight
    linear.weight = nn.Parameter(matrix.to(device=device, dtype=dtype).contiguous(), requires_grad=linear.weight.requires_grad)
    if augmented:
        bias = weight[:, -1].to(device=device, dtype=dtype).contiguous()
        if linear.bias is not None or bias.abs().max() > 0:
            linear.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = matrix.shape


@torch.no_grad()
def attention_input_moments(model: nn.Module, batches: Sequence[torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``{layer: E[x x^T]}`` (float64, (hidden [+1], hidden [+1])) over every token of ``batches``."""
    arch = arch_of(model)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def moments(index: int, augmented: bool):
        def add(hidden: torch.Tensor, _kwargs: dict) -> None:
            x = hidden.reshape(-1, hidden.shape[-1]).double()  # (tokens, hidden)
            if augmented:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # (tokens, hidden + 1)
            sums[index] = sums.get(index, 0) + x.T @ x
            counts[index] = counts.get(index, 0) + x.shape[0]
        return add

    attention_input_pass(model, batches, {index: moments(index, has_bias(arch.attention(index))) for index in layers})
    return {index: sums[index] / counts[index] for index in layers}
