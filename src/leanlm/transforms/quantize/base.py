"""The base of every weight-only quantized Linear, the registry of schemes, and byte counting.

A scheme turns an ``nn.Linear`` into a module that holds integer codes and scales (never the float
weight) and multiplies with a packed-weight kernel on CPU (leanlm's ``torch.ops.leanlm`` or ATen's);
on other devices it falls back to dequantize-then-matmul, which is correct but not fast. Every module
can tell the step of its quantization grid per weight (``step_sizes``), so tests can check the kernel
against the bound ``|y_q - y| <= sum_k |x_k| * step_nk / 2`` that round-to-nearest guarantees (plus,
for leanlm's int8 and int4 kernels, which round their inputs to int8 per block of 32 (``input_steps``),
``sum_k |w_hat_nk| * input_step_k / 2``).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.switch import Switch
from leanlm.models.weights import held_bytes, tensors_held  # noqa: F401  (re-exported: quantize reports them)

# The packed kernels are matrix-vector kernels: fast at decode (few rows), several times slower than
# the float GEMM at prefill. Above this many rows, forward dequantizes the weight for that call.
KERNEL_MAX_ROWS = 128
# leanlm's int8 and int4 kernels round their input rows to int8 with one step per this many inputs.
INPUT_BLOCK = 32
# On: every CPU call takes the packed kernel, whatever its row count, so that a perplexity measured by
# prefill computes what decoding computes (the int8 and int4 kernels round their inputs to int8; the float paths
# do not).
kernel_for_every_call = Switch(False)


def use_kernel_for_every_call(enabled: bool = True):
    """Within the block, every CPU call uses leanlm's decode kernel, whatever its rows (int8: also 17-128 rows, which
    otherwise take ATen's int8 matmul; int4: also calls above KERNEL_MAX_ROWS): slow, exactly what decoding computes."""
    return kernel_for_every_call.set(enabled)


class QuantizedLinear(nn.Module):
    """A Linear whose weight is held as integer codes + scales; subclasses implement one scheme."""

    scheme: ClassVar[str]
    bits: ClassVar[int]

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    @abstractmethod
    def check(cls, in_features: int, out_features: int, group_size: int) -> str | None:
        """Why this scheme cannot hold a (out, in) weight with this group size, or None when it can."""

    @classmethod
    @abstractmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> "QuantizedLinear":
        """Quantize a (out, in) float weight (round to nearest); scales are kept in the weight's dtype."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, torch.Tensor], group_size: int) -> "QuantizedLinear":
        """Rebuild from ``portable_state()`` (the checkpoint form)."""

    @abstractmethod
    def portable_state(self) -> dict[str, torch.Tensor]:
        """Codes and scales in a documented, kernel-independent layout (what a checkpoint stores)."""

    @abstractmethod
    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The dequantized weight rows ``rows`` (LongTensor (T,)) -> (T, in_features), in the scale dtype."""

    @abstractmethod
    def step_sizes(self) -> torch.Tensor:
        """The grid step of every weight, (out, in) float32: the rounding error is at most half of it."""

    @abstractmethod
    def _kernel(self, x2d: torch.Tensor) -> torch.Tensor:
        """(tokens, in) in the scale dtype -> (tokens, out) with the CPU packed-weight kernel."""

    @property
    def dtype(self) -> torch.dtype:
        return self.scale_dtype()

    @abstractmethod
    def scale_dtype(self) -> torch.dtype:
        """The float dtype the kernel computes in (that of the original weight)."""

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(torch.arange(self.out_features, device=self._device()))  # (out, in)

    def _device(self) -> torch.device:
        return next(iter(self.buffers())).device

    def takes_kernel(self, x2d: torch.Tensor) -> bool:
        """Whether ``forward`` multiplies these (tokens, in) inputs with the packed kernel (else: dequantizes)."""
        return x2d.device.type == "cpu" and (x2d.shape[0] <= KERNEL_MAX_ROWS or bool(kernel_for_every_call))

    def _rounds_inputs(self, x2d: torch.Tensor) -> bool:
        """Whether ``_kernel`` rounds these (tokens, in) inputs to int8 (leanlm's int8 and int4 kernels do)."""
        return False

    def _kernel_inputs(self, x2d: torch.Tensor) -> torch.Tensor:
        """What ``_kernel`` multiplies (and rounds): the inputs, or a scheme's transform of them."""
        return x2d

    def input_steps(self, x2d: torch.Tensor) -> torch.Tensor | None:
        """The step each input of ``x2d`` (tokens, in) is rounded with by ``forward`` ((tokens, in) float32; at
        most half of it is lost), or None where the call does not round its inputs. The kernels round per
        block of 32 inputs with step max |x| / 127."""
        if not (self.takes_kernel(x2d) and self._rounds_inputs(x2d)):
            return None
        x2d = self._kernel_inputs(x2d.to(self.scale_dtype()))
        steps = x2d.float().abs().reshape(x2d.shape[0], -1, INPUT_BLOCK).amax(-1) / 127  # (tokens, in / 32)
        return steps.repeat_interleave(INPUT_BLOCK, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, in_dtype = x.shape, x.dtype
        x2d = x.reshape(-1, self.in_features).to(self.scale_dtype())  # (tokens, in)
        if self.takes_kernel(x2d):
            y = self._kernel(x2d.contiguous())  # (tokens, out): reads the packed codes
        else:  # prefill, or no packed kernel on this device: a float copy of this one weight, for this call only
            y = F.linear(x2d, self.dequantize())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(in_dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}, group={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """An embedding that reads its rows from a quantized output head (tied weights stay shared)."""

    def __init__(self, head: QuantizedLinear, padding_idx: int | None = None):
        super().__init__()
        self.head = [head]  # a list, so the head's tensors are not registered (and counted) twice
        self.num_embeddings, self.embedding_dim, self.padding_idx = head.out_features, head.in_features, padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.head[0].dequantize_rows(ids.reshape(-1))  # (tokens, hidden)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, shares the {self.head[0].scheme} output head"


def round_up_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` (float32) in ``dtype``, never smaller than asked: the grid then covers the range it must."""
    if dtype == torch.float32:
        return scale.clone()
    rel = torch.finfo(dtype).eps  # one ulp relative; rounding to nearest moves at most half of it
    return (scale * (1 + rel)).to(dtype)


SCHEMES: dict[str, type[QuantizedLinear]] = {}


def register(cls: type[QuantizedLinear]) -> type[QuantizedLinear]:
    SCHEMES[cls.scheme] = cls
    return cls


def scheme_class(scheme: str) -> type[QuantizedLinear]:
    if scheme not in SCHEMES:
        raise LeanLMError(f"unknown weight quantization scheme '{scheme}': choose one of {', '.join(sorted(SCHEMES))}")
    return SCHEMES[scheme]
