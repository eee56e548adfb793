"""What a distillation run sets up before its loop: bf16 or not, the accelerator, which parameters train."""

from __future__ import annotations

import os
import re

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from leanlm.errors import LeanLMError


def bf16_supported() -> bool:
    """Whether the hardware computes in bf16 natively.

    GPU: `torch.cuda.is_bf16_supported()`. CPU: the AVX512-BF16 or AMX instructions (oneDNN then
    runs bf16 matmuls natively; without them bf16 is emulated and slower than float32).
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def auto_bf16() -> bool:
    """What ``bf16=None`` means: autocast on a bf16 GPU, not on CPU.

    On a 2-core AVX512-BF16 CPU this project has run on, autocast over float32 weights was measured
    slower than plain float32 (SmolLM2-135M, batch 4 x 256: forward 9.1 s vs 7.3 s, training step
    about 1.4x slower): each forward re-casts every weight and the element-wise ops bounce between
    dtypes. The CPU speed-up comes from loading both models in bfloat16 instead (a LoRA distill step
    took about 5 s instead of about 15 s); peft keeps the LoRA adapters in float32 on a bf16 base and
    the KD loss is computed in float32 either way. On CPUs without a bf16 GEMM (AVX2) distill() runs the
    bf16 base's products widened to float32 (models/widen.py): ~10 s per step there against ~214 s.
    """
    return torch.cuda.is_available() and bf16_supported()


def train_only(model: nn.Module, name_patterns: list[str] | tuple[str, ...] | str) -> list[str]:
    """Make exactly the parameters whose name matches a pattern (regex search) trainable.

    E.g. ``train_only(model, ["o_proj"])`` for KD without LoRA on the attention outputs. Returns the
    trainable names; a pattern that matches nothing is an error (it is almost always a typo).
    """
    patterns = [name_patterns] if isinstance(name_patterns, str) else list(name_patterns)
    if not patterns:
        raise LeanLMError("train_only needs at least one parameter name pattern")
    compiled = [re.compile(p) for p in patterns]
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(c.search(name) for c in compiled))
        if param.requires_grad:
            chosen.append(name)
    names = [name for name, _ in model.named_parameters()]
    for pattern in compiled:
        if not any(pattern.search(name) for name in names):
            raise LeanLMError(f"train_only: pattern '{pattern.pattern}' matches no parameter of the model")
    return chosen


def make_accelerator(bf16: bool, cpu: bool) -> Accelerator:
    precision = "bf16" if bf16 else "no"
    state = AcceleratorState._shared_state
    changed = state and (state.get("_mixed_precision") != precision or state.get("_cpu") != cpu)
    if changed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one process-wide state and refuses a second precision. In a single process
        # (a notebook, the tests, a pipeline distilling twice) each call may choose its own, so reset it.
        AcceleratorState._reset_state(reset_partial_state=state.get("_cpu") != cpu)  # the device lives in PartialState
    # The schedule counts optimizer steps, so the scheduler must step once per step on every process.
    # cpu=True keeps a CPU student on the CPU even where a GPU exists: the caller chose the device, not accelerate.
    return Accelerator(mixed_precision=precision, step_scheduler_with_optimizer=False, cpu=cpu)
