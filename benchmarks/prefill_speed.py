"""Prefill speed of a bf16 model on the CPU: ATen's bf16 GEMM against leanlm's widened prefill.

    PYTHONPATH=src .venv/bin/python benchmarks/prefill_speed.py --out runs/speed/prefill.json

``StreamingLinear`` (engine/streaming_linear.py) runs prefill-sized calls in float32 where oneDNN has
no bf16 GEMM for the CPU. This times one forward of a prompt of each length (``logits_to_keep=1``, as
the engine and the server prefill) with plain ``nn.Linear`` layers and with streaming ones, the two
alternated per round, medians; it also records how far the two paths' logits are apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from leanlm.engine.streaming_linear import disable_streaming_linears, enable_streaming_linears, native_bf16_matmul  # noqa: E402
from leanlm.evaluate.side_by_side import alternate  # noqa: E402
from leanlm.models import load_model  # noqa: E402
from leanlm.report import git_info, versions  # noqa: E402

from benchmarks_common import print_ab, widened_ab_row, write_report  # noqa: E402


def timed_prefill(model, ids: torch.Tensor, widened: bool) -> float:
    (enable_streaming_linears if widened else disable_streaming_linears)(model)
    with torch.inference_mode():
        began = time.perf_counter()
        model(ids, logits_to_keep=1)
        return time.perf_counter() - began


def logit_gap(model, ids: torch.Tensor) -> dict:
    with torch.inference_mode():
        disable_streaming_linears(model)
        aten = model(ids, logits_to_keep=1).logits[0, -1].float()
        enable_streaming_linears(model)
        widened = model(ids, logits_to_keep=1).logits[0, -1].float()
    return {"max_abs_logit_difference": (aten - widened).abs().max().item(),
            "same_argmax": bool(aten.argmax() == widened.argmax())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, torch.bfloat16)
    report = {"benchmark": "prefill_speed", "model": args.model, "threads": args.threads,
              "native_bf16_gemm": native_bf16_matmul(), "load_average_at_start": os.getloadavg(),
              "versions": versions(), "git": git_info(), "rows": []}
    generator = torch.Generator().manual_seed(0)
    for length in args.lengths:
        ids = torch.randint(100, 20000, (1, length), generator=generator)
        timed_prefill(model, ids, False), timed_prefill(model, ids, True)  # warm-up, untimed
        runs = alternate({"aten_bf16": lambda: timed_prefill(model, ids, False),
                          "widened": lambda: timed_prefill(model, ids, True)}, args.rounds)
        row = {"prompt_tokens": length, **widened_ab_row(runs, length), **logit_gap(model, ids)}
        report["rows"].append(row)
        print_ab(f"{length} tokens", row, f", max logit difference {row['max_abs_logit_difference']:.3g}")
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
