"""Evaluation and distillation speed of a bf16 model on the CPU: ATen's bf16 GEMM against widened linears.

    PYTHONPATH=src .venv/bin/python benchmarks/widen_speed.py --out runs/speed/widen.json

``models/widen.py`` runs the many-row products of bf16 linears in float32 where oneDNN has no bf16 GEMM
for the CPU; perplexity, head scoring, the layer-local stage and distillation run under it. This times
two workloads with widening off and on, alternated per round, medians:
- ``perplexity``: ``token_nll`` over ``--eval-windows`` non-overlapping windows of 512 tokens;
- ``distill_step``: one KD step as ``distill`` takes it — teacher forward (no gradient), student forward
  and backward through LoRA adapters (rank 16, attention and MLP), KL at temperature 2 — on a batch of
  4 x 256 tokens.
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
from leanlm.evaluate.side_by_side import alternate  # noqa: E402
from leanlm.models import load_model, load_tokenizer  # noqa: E402
from leanlm.models.widen import native_bf16_matmul, use_widening, widened_linears  # noqa: E402
from leanlm.recover import LoraSettings, add_lora, kd_loss  # noqa: E402
from leanlm.report import git_info, versions  # noqa: E402

from benchmarks_common import print_ab, widened_ab_row, write_report  # noqa: E402


def timed_perplexity(model, ids: torch.Tensor, windows, widened: bool) -> tuple[float, float]:
    with use_widening(widened):
        began = time.perf_counter()
        total, count, _ = token_nll(model, ids, windows, desc="perplexity")
        return time.perf_counter() - began, total / count


def timed_step(student, teacher, batch: torch.Tensor, widened: bool) -> float:
    with use_widening(widened), widened_linears(student, teacher):
        began = time.perf_counter()
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits
        loss, _ = kd_loss(student(input_ids=batch, use_cache=False).logits, target, batch, 1.0, 2.0)
        loss.backward()
        spent = time.perf_counter() - began
    student.zero_grad(set_to_none=True)
    return spent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher, tokenizer = load_model(args.model, torch.bfloat16).requires_grad_(False), load_tokenizer(args.model)
    student = add_lora(copy.deepcopy(teacher), LoraSettings(rank=16, include_mlp=True)).train()
    ids = tokenize_split(tokenizer, "validation")[: 512 * args.eval_windows]
    windows = nonoverlapping_windows(len(ids), 512)
    batch = tokenize_split(tokenizer, "validation")[50_000 : 50_000 + 4 * 256].view(4, 256)
    report = {"benchmark": "widen_speed", "model": args.model, "threads": args.threads,
              "native_bf16_gemm": native_bf16_matmul(), "load_average_at_start": os.getloadavg(),
              "versions": versions(), "git": git_info(), "rows": []}
    nll = {}
    work = {
        "perplexity": (len(ids), lambda widened: timed_perplexity(teacher, ids, windows, widened)),
        "distill_step": (batch.numel(), lambda widened: (timed_step(student, teacher, batch, widened), None)),
    }
    for name, (tokens, run) in work.items():
        def once(widened: bool, run=run, name=name) -> float:
            seconds, value = run(widened)
            nll[(name, widened)] = value
            return seconds

        once(True)  # warm-up, untimed
        runs = alternate({"aten_bf16": lambda: once(False), "widened": lambda: once(True)}, args.rounds)
        row = {"workload": name, "tokens": tokens, **widened_ab_row(runs, tokens)}
        if nll[(name, True)] is not None:
            row["mean_nll"] = {"aten_bf16": nll[(name, False)], "widened": nll[(name, True)]}
        report["rows"].append(row)
        print_ab(name, row, f" {row.get('mean_nll', '')}")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
