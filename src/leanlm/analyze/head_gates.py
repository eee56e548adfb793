"""Gate each attention head's output: 1 keeps it, 0 removes it exactly, anything between scales it.

The gate multiplies head h's slice of the ``o_proj`` input, so gate 0 removes the head's whole
contribution to the residual stream: the same logits as a model whose o_proj columns for the head
are zero, i.e. as physically pruning it. Gates may require grad (the Taylor scorer differentiates
the loss with respect to them, as in Michel et al. 2019).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, arch_of

# (layers, heads) when uniform, else one tensor per layer: (heads_l,), or (batch, heads_l) to gate each
# sequence of the batch differently (the KL scorer runs many ablations in one stacked forward).
Gates = torch.Tensor | Sequence[torch.Tensor]


def split_gates(gates: Gates, spec: ModelSpec) -> list[torch.Tensor]:
    """One gate tensor per layer, (heads_l,) or (batch, heads_l), checked against the model's head counts."""
    per_layer = list(gates.unbind(0)) if isinstance(gates, torch.Tensor) and gates.dim() == 2 else list(gates)
    ok = len(per_layer) == spec.num_layers and all(
        g.dim() in (1, 2) and g.shape[-1] == n for g, n in zip(per_layer, spec.heads_per_layer)
    )
    if not ok:
        shapes = [tuple(g.shape) for g in per_layer]
        raise LeanLMError(f"head gates must have one value per query head of each layer {list(spec.heads_per_layer)}, got shapes {shapes}")
    return per_layer


def _gate_hook(gate: torch.Tensor, head_dim: int):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]  # (batch, seq, heads * head_dim): the concatenated head outputs
        heads = x.view(*x.shape[:-1], -1, head_dim)  # (batch, seq, heads, head_dim)
        if gate.dim() == 1:
            scale = gate.to(x.dtype)[:, None]  # (heads, 1): the same gates for every sequence
        else:
            scale = gate.to(x.dtype)[:, None, :, None]  # (batch, 1, heads, 1): gates per sequence
        return ((heads * scale).reshape(x.shape), *args[1:])

    return hook


@contextlib.contextmanager
def head_gates(model: nn.Module, gates: Gates) -> Iterator[None]:
    """Within the block, every forward of ``model`` has head h of layer l scaled by ``gates[l][h]``."""
    spec = ModelSpec.from_model(model)
    per_layer = split_gates(gates, spec)
    handles = []
    try:
        for view, gate in zip(arch_of(model).attentions(), per_layer):
            hook = _gate_hook(gate, spec.head_dim)
            handles.append(view.o_proj.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def ablation_gates(spec: ModelSpec, layer: int, heads: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """All-ones gates except 0 for ``heads`` of ``layer``: removes exactly those heads."""
    gates = [torch.ones(n, device=device) for n in spec.heads_per_layer]
    gates[layer][list(heads)] = 0.0
    return gates
