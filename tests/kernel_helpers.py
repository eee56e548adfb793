"""What the int8 and int4 decode kernels compute, emulated in float64 (engine/kernels/linear_int8.cpp, linear_int4.cpp)."""

from __future__ import annotations

import torch


def rounded_inputs(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) rounded as the kernels do, in float64: per block of 32, step max|x| / 127, ties to even."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax as one division (Python's 127 / tensor is reciprocal(tensor) * 127: two roundings)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse).double() * (amax / 127).double()).reshape(x.shape)
