"""Evaluation and distillation speed of a bf16 model on the CPU: ATen's bf16 kernels against widening.

    PYTHONPATH=src .venv/bin/python benchmarks/widen_speed.py --out runs/speed/widen.json
    PYTHONPATH=src .venv/bin/python benchmarks/widen_speed.py --base linears --out runs/speed/wide_attention.json

``models/widen.py`` runs the many-row products of bf16 linears, and bf16 sdpa attention with many
queries, in float32 where oneDNN has no bf16 GEMM for the CPU; perplexity, head scoring, the layer-local
stage and distillation run under it. This times the workloads below with and without it, alternated per
round, medians. ``--base aten`` (default): the A arm is no widening at all; ``--base linears``: the A
arm widens the linears but leaves attention to PyTorch's bf16 kernel (what the attention half adds).
- ``perplexity``: ``token_nll`` over ``--eval-windows`` non-overlapping windows of 512 tokens;
- ``distill_step``: one KD step as ``distill`` takes it — teacher forward (no gradient), student forward
  and backward through LoRA adapters (rank 16, attention and MLP), KL at temperature 2 — on a batch of
  4 x 256 tokens; ``distill_step_1024``: the same on 1 x 1024 tokens (longer context, more attention).
It also records how far the two paths' perplexities are apart.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from leanlm.data import nonoverlapping_windows, tokenize_split  # noqa: E402
from leanlm.evaluate import token_nll  # noqa: E402
from leanlm.evaluate.side_by_side import alternate, median_ratio  # noqa: E402
from leanlm.models import load_model, load_tokenizer  # noqa: E402
from leanlm.models.widen import native_bf16_matmul, use_wide_attention, use_widening, widened_linears  # noqa: E402
from leanlm.recover import LoraSettings, add_lora, kd_loss  # noqa: E402
from leanlm.report import git_info, versions  # noqa: E402

from benchmarks_common import print_ab, widened_ab_row, write_report  # noqa: E402


BASE_ARMS = {"aten": "aten_bf16", "linears": "linears_only"}  # --base -> the A arm's name in the report


def arm(widened: bool, base: str):
    """The setting of one run: everything widened, or the A arm (no widening / linears only)."""
    if widened:
        return use_widening(True)
    return use_widening(False) if base == "aten" else use_wide_attention(False)


def timed_perplexity(model, ids: torch.Tensor, windows, widened: bool, base: str = "aten") -> tuple[float, float]:
    with arm(widened, base):
        began = time.perf_counter()
        total, count, _ = token_nll(model, ids, windows, desc="perplexity")
        return time.perf_counter() - began, total / count


def timed_step(student, teacher, batch: torch.Tensor, widened: bool, base: str = "aten") -> float:
    with arm(widened, base), widened_linears(student, teacher):
        began = time.perf_counter()
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits
        loss, _ = kd_loss(student(input_ids=batch, use_cache=False).logits, target, batch, 1.0, 2.0)
        loss.backward()
        spent = time.perf_counter() - began
    student.zero_grad(set_to_none=True)
    return spent


def linears_only_row(runs: dict[str, list[float]], tokens: int) -> dict:
    """Seconds of alternated ``linears_only`` / ``widened`` runs -> medians of tokens/s and their ratio."""
    speed = median_ratio([tokens / t for t in runs["linears_only"]], [tokens / t for t in runs["widened"]])
    return {"linears_only_seconds": runs["linears_only"], "widened_seconds": runs["widened"],
            "linears_only_tokens_per_s": speed["base"], "widened_tokens_per_s": speed["candidate"],
            "speed_ratio": speed["ratio"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", choices=sorted(BASE_ARMS), default="aten",
                        help="A arm: no widening (aten) or widened linears with bf16 attention (linears)")
    parser.add_argument("--workloads", default="perplexity,distill_step,distill_step_1024")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model(args.model, torch.bfloat16).requires_grad_(False), load_tokenizer(args.model)
    student = add_lora(copy.deepcopy(teacher), LoraSettings(rank=16, include_mlp=True)).train()
    ids = tokenize_split(tokenizer, "validation")[: 512 * args.eval_windows]
    windows = nonoverlapping_windows(len(ids), 512)
    batch = tokenize_split(tokenizer, "validation")[50_000 : 50_000 + 4 * 256].view(4, 256)
    long_batch = batch.reshape(1, 1024)
    base = args.base
    report = {"benchmark": "widen_speed", "model": args.model, "threads": args.threads, "base": BASE_ARMS[base],
              "native_bf16_gemm": native_bf16_matmul(), "load_average_at_start": os.getloadavg(),
              "versions": versions(), "git": git_info(), "rows": []}
    nll = {}
    work = {
        "perplexity": (len(ids), lambda widened: timed_perplexity(teacher, ids, windows, widened, base)),
        "distill_step": (batch.numel(), lambda widened: (timed_step(student, teacher, batch, widened, base), None)),
        "distill_step_1024": (long_batch.numel(),
                              lambda widened: (timed_step(student, teacher, long_batch, widened, base), None)),
    }
    work = {name: work[name] for name in args.workloads.split(",")}
    for name, (tokens, run) in work.items():
        def once(widened: bool, run=run, name=name) -> float:
            seconds, value = run(widened)
            nll[(name, widened)] = value
            return seconds

        once(True)  # warm-up, untimed
        runs = alternate({BASE_ARMS[base]: lambda: once(False), "widened": lambda: once(True)}, args.rounds)
        row = {"workload": name, "tokens": tokens,
               **(widened_ab_row(runs, tokens) if base == "aten" else linears_only_row(runs, tokens))}
        if nll[(name, True)] is not None:
            row["mean_nll"] = {BASE_ARMS[base]: nll[(name, False)], "widened": nll[(name, True)]}
        report["rows"].append(row)
        if base == "aten":
            print_ab(name, row, f" {row.get('mean_nll', '')}")
        else:
            print(f"{name}: linears only {row['linears_only_tokens_per_s']:.0f} tok/s, linears + attention "
                  f"{row['widened_tokens_per_s']:.0f} tok/s ({row['speed_ratio']:.2f}x) {row.get('mean_nll', '')}", flush=True)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
