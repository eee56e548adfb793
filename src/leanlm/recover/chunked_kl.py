"""KL(teacher^T || student^T) per position over a large vocabulary, a few rows at a time, with its gradient.

Autograd through ``log_softmax`` over (positions, vocab) keeps several (positions, vocab) float32
tensors — the tempered logits, both log-softmaxes, the teacher's probabilities — and walks each of them
more than once: with SmolLM2's 49,152-token vocabulary and 1,020 positions, ~200 MB each, each
freshly allocated (page faults are a large part of an element-wise op's time on this project's
virtual machines). The gradient with respect to the student's logits is known in closed form once
both softmaxes are:

    d KL / d s = (softmax(s / T) - softmax(t / T)) / T

so ``TemperedKL`` computes the KL a chunk of rows at a time and keeps only that gradient, one
(positions, vocab) float32 tensor, for the backward pass (``benchmarks/kd_loss_speed.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_ROWS = 128  # 128 x 49,152 float32 = 25 MB per temporary; fastest of 32..512 on this project's machine
# (1,020 rows, busy machine: 1.4 s forward + backward against 2.1 s through autograd, 32-row chunks 3.2-3.6 s;
# idle: 0.65 s against 1.31 s, benchmarks/kd_loss_speed.py)


class TemperedKL(torch.autograd.Function):
    """``kl[i] = sum_v p_t[i, v] (log p_t[i, v] - log p_s[i, v])`` at temperature T, float32, (positions,)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk: int, keep_grad: bool):
        rows = student.shape[0]
        kl = torch.empty(rows, dtype=torch.float32, device=student.device)
        # needs_input_grad ignores grad mode, so the caller says whether the gradient is wanted at all.
        grad = torch.empty(student.shape, dtype=torch.float32, device=student.device) if keep_grad else None
        for first in range(0, rows, chunk):
            part = slice(first, first + chunk)
            log_p_student = F.log_softmax(student[part].float() / temperature, dim=-1)
            log_p_teacher = F.log_softmax(teacher[part].float() / temperature, dim=-1)
            p_teacher = log_p_teacher.exp()
            kl[part] = (p_teacher * (log_p_teacher - log_p_student)).sum(-1)
            if grad is not None:
                grad[part] = log_p_student.exp_().sub_(p_teacher).div_(temperature)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        return kl

    @staticmethod
    @once_differentiable  # the closed form is a first derivative only: a second one raises instead of lying
    def backward(ctx, grad_kl: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_kl.unsqueeze(-1)).to(ctx.student_dtype), None, None, None, None


def tempered_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Per-position KL(softmax(teacher / T) || softmax(student / T)), (positions,) float32; both (positions, vocab).

    The teacher is a constant (KD): no gradient flows to it, even if its logits would take one."""
    keep_grad = torch.is_grad_enabled() and student.requires_grad
    return TemperedKL.apply(student, teacher.detach(), temperature, chunk, keep_grad)


@torch.no_grad()
def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of (positions, vocab) logits against (positions,) targets, float32, no gradient:
    the value a KL-only step logs, without a (positions, vocab) log-softmax of its own."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for first in range(0, logits.shape[0], chunk):
        part = slice(first, first + chunk)
        total += F.cross_entropy(logits[part].float(), targets[part], reduction="sum")
    return total
