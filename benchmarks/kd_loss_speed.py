"""Speed of the distillation KL over a full vocabulary: autograd through two log-softmaxes against
``recover.chunked_kl.tempered_kl`` (a few rows at a time, closed-form gradient), forward + backward.

    PYTHONPATH=src .venv/bin/python benchmarks/kd_loss_speed.py --out runs/speed/kd_loss.json

The shape is one distillation step of SmolLM2 (4 x 256 tokens: 1,020 scored positions, 49,152-token
vocabulary, bf16 logits as the model returns them); the two are alternated per round, medians; the
report also records the largest difference between the two gradients.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from leanlm.evaluate.side_by_side import alternate, median_ratio  # noqa: E402
from leanlm.recover.chunked_kl import tempered_kl  # noqa: E402
from leanlm.report import atomic_write_json, git_info, versions  # noqa: E402


def autograd_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The formula as kd_loss wrote it before: float32 copies, two log-softmaxes, autograd through all."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)


def timed(kl_fn, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> tuple[float, torch.Tensor]:
    leaf = student.detach().requires_grad_()
    began = time.perf_counter()
    kl_fn(leaf, teacher, temperature).mean().backward()
    return time.perf_counter() - began, leaf.grad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--positions", type=int, default=1020)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    student = (4 * torch.randn(args.positions, args.vocab, generator=generator)).bfloat16()
    teacher = (4 * torch.randn(args.positions, args.vocab, generator=generator)).bfloat16()
    fns = {"autograd": autograd_kl, "chunked": tempered_kl}
    grads = {name: timed(fn, student, teacher, args.temperature)[1] for name, fn in fns.items()}  # warm-up
    runs = alternate({name: (lambda fn=fn: timed(fn, student, teacher, args.temperature)[0]) for name, fn in fns.items()},
                     args.rounds)
    speed = median_ratio([1 / t for t in runs["autograd"]], [1 / t for t in runs["chunked"]])
    report = {"benchmark": "kd_loss_speed", "shape": [args.positions, args.vocab], "temperature": args.temperature,
              "threads": args.threads, "load_average_at_start": os.getloadavg(), "seconds": runs,
              "autograd_median_seconds": 1 / speed["base"], "chunked_median_seconds": 1 / speed["candidate"],
              "speed_ratio": speed["ratio"],
              "max_gradient_difference": (grads["autograd"].float() - grads["chunked"].float()).abs().max().item(),
              "versions": versions(), "git": git_info()}
    atomic_write_json(args.out, report)
    print(f"KL forward + backward, {args.positions} x {args.vocab}: autograd {1 / speed['base']:.3f} s, chunked "
          f"{1 / speed['candidate']:.3f} s ({speed['ratio']:.2f}x); max gradient difference "
          f"{report['max_gradient_difference']:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
