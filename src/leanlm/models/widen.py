"""bf16 linear layers whose many-row products run in float32 on CPUs without bf16 arithmetic.

On CPUs where oneDNN has no bf16 GEMM (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` False: AVX2
machines such as this project's), ATen's bf16 GEMM converts inside its inner loops and runs ~6x slower
than a float32 GEMM of the same shape (a (128, 576) x (576, 1536) product: 12.0 ms against 1.8 ms).
A bf16 model's evaluation, head scoring and distillation are nothing but such products. ``WideLinear``
runs a call with more than ``MIN_ROWS`` rows in float32 instead: input and weight widened for that one
call, float32 GEMM, the result rounded back to bf16 once — the same bf16 model (ATen's bf16 GEMM also
accumulates in float32 and rounds once), computed faster. Autograd goes through the casts, so training
widens too (the float32 copies then live until the backward pass). Small calls (decode) stay in bf16.

``widened_linears(*models)`` applies it for the duration of a block and restores the modules after;
on CPUs with native bf16, on GPUs and for float32 models it changes nothing. Within the block the
models' ``sdpa`` attention is widened the same way (``wide_sdpa_attention``, registered with
transformers' ``AttentionInterface`` and selected by the config's ``_attn_implementation``, as
``kvcache/fused.py`` does): PyTorch's bf16 CPU attention has the same slow inner loops (4 x 256 tokens,
30 layers, forward + backward: 4.1 s in bf16 against 0.86 s in float32 here). It swaps the modules'
class, so: a deepcopy or ``torch.save`` of a model inside the block keeps ``WideLinear`` modules (they
load and behave as ``nn.Linear`` elsewhere) and a deepcopy keeps the widened attention name, two threads sharing one model share the swap, and a
module whose forward accelerate has hooked keeps ``nn.Linear``'s forward. Under CPU autocast the GEMM
is left to autocast (it would cast the widened inputs back to bf16).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from leanlm.switch import Switch

WIDE_ATTENTION = "leanlm_wide_sdpa"  # the attention-implementation name a widened block gives sdpa models
MIN_ROWS = 16  # at most this many rows (a decode step) stay in bf16: widening them would only add the copy
# (equal to engine.kernels.MAX_ROWS, the largest call the decode kernel takes: a test holds them together)
_native_bf16: dict = {}
_switch = Switch(True)
_attention_switch = Switch(True)  # the attention half alone (benchmarks/widen_speed.py --base linears)


def native_bf16_matmul() -> bool:
    """Whether oneDNN has a bf16 GEMM for this CPU (its own check: AVX512 cores and up); where it has
    not (AVX2), ATen's bf16 GEMM converts in its inner loops and float32 is the faster way for many rows."""
    if "cpu" not in _native_bf16:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            _native_bf16["cpu"] = bool(check()) if check is not None else True
        except RuntimeError:  # an op that is not there in this build: assume native, change nothing
            _native_bf16["cpu"] = True
    return _native_bf16["cpu"]


def use_widening(enabled: bool):
    """Switch widening off (or on) for a block: the A/B of ``benchmarks/widen_speed.py``."""
    return _switch.set(enabled)


def use_wide_attention(enabled: bool):
    """Switch the widening of attention alone off (or on) for a block: linears widened, attention in bf16."""
    return _attention_switch.set(enabled)


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


class WideLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters, state-dict keys and hooks) whose bf16 CPU calls with more than
    ``MIN_ROWS`` rows run in float32 where the CPU has no bf16 GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._widen(x, rows_of(x)):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)

    def _widen(self, x: torch.Tensor, rows: int) -> bool:
        return (rows > MIN_ROWS and x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.bfloat16
                and bool(_switch) and not native_bf16_matmul() and not torch.is_autocast_enabled("cpu"))


def _widen_attention(query: torch.Tensor) -> bool:
    return (query.shape[-2] > MIN_ROWS and query.device.type == "cpu" and query.dtype == torch.bfloat16
            and bool(_switch) and bool(_attention_switch) and not native_bf16_matmul()
            and not torch.is_autocast_enabled("cpu"))


def wide_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs):
    """transformers' sdpa attention function, run in float32 for bf16 CPU calls with more than ``MIN_ROWS``
    queries (query (batch, heads, q, head_dim)); the output rounded to bf16 once. Decode steps stay bf16."""
    if not _widen_attention(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()  # an additive mask must match the widened query
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


ALL_ATTENTION_FUNCTIONS.register(WIDE_ATTENTION, wide_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(WIDE_ATTENTION, sdpa_mask)


def _sdpa_configs(models) -> list:
    """The distinct configs of the transformers models inside ``models`` whose attention is ``sdpa``."""
    configs = {id(m.config): m.config for model in models if model is not None for m in model.modules()
               if isinstance(m, PreTrainedModel)}
    return [c for c in configs.values() if getattr(c, "_attn_implementation_internal", None) == "sdpa"]


def widens(module: nn.Module) -> bool:
    """Whether ``widened_linears`` would turn this module into a ``WideLinear``."""
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and weight is not None and weight.dtype == torch.bfloat16
            and weight.device.type == "cpu" and bool(_switch) and not native_bf16_matmul())


@contextmanager
def widened_linears(*models: nn.Module | None) -> Iterator[int]:
    """Within the block, the plain bf16 CPU ``nn.Linear`` modules of ``models`` are ``WideLinear``
    (yields how many) and their ``sdpa`` attention is ``wide_sdpa_attention``; afterwards both are as
    they were. ``None`` entries are skipped."""
    swapped = [m for model in models if model is not None for m in model.modules() if widens(m)]
    configs = _sdpa_configs(models) if swapped else []  # bf16 models on a CPU without a bf16 GEMM only
    for module in swapped:
        module.__class__ = WideLinear
    for config in configs:  # the attribute itself: the property's setter would also rewrite sub-configs
        config._attn_implementation_internal = WIDE_ATTENTION
    try:
        yield len(swapped)
    finally:
        for module in swapped:
            if type(module) is WideLinear:
                module.__class__ = nn.Linear
        for config in configs:
            if config._attn_implementation_internal == WIDE_ATTENTION:
                config._attn_implementation_internal = "sdpa"
