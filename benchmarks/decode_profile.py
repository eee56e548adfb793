"""Where one decode step's time goes, per batch size: linear layers (weights read), the output head
over the vocabulary, attention, other ops, and Python/framework overhead (wall time not spent in ops).

    PYTHONPATH=src python benchmarks/decode_profile.py --out out/decode_profile.json [--batches 1,4,16]

Runs the engine's eager decode step through torch.profiler on the bundled model in bf16, after a
prompt of --prompt tokens; --cache static|dynamic. Shared machine: read the shares, not the ms.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from leanlm.engine import Sampler, static_cache
from leanlm.engine.decode import forward, prefill, start_state
from leanlm.models import load_model

TOP_LEVEL_SKIP = ("aten::empty", "aten::as_strided", "aten::view", "aten::_unsafe_view", "aten::reshape",
                  "aten::t", "aten::transpose", "aten::expand", "aten::unsqueeze", "aten::slice", "aten::select")


def category(name: str, shapes, vocab: int) -> str:
    if name in ("aten::linear", "aten::mm", "aten::addmm", "aten::matmul"):
        flat = str(shapes)
        return "lm_head" if str(vocab) in flat else "linear (weights)"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    return "other ops"


def profile_step(model, batch: int, prompt: int, steps: int, cache_kind: str) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    from transformers import DynamicCache

    cache = static_cache(model, prompt + steps + 4) if cache_kind == "static" else DynamicCache()
    state = start_state(model, ids, None, cache, prompt + steps + 4)
    sampler = Sampler()
    with torch.inference_mode():
        token = sampler.sample(prefill(model, ids, state, chunk=prompt))[:, None]
        for _ in range(2):  # warm-up
            token = sampler.sample(forward(model, token, state)[:, -1])[:, None]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                token = sampler.sample(forward(model, token, state)[:, -1])[:, None]
            wall = time.perf_counter() - start
    totals: dict[str, float] = defaultdict(float)
    # Top-level ops only (no parent op): their CPU time sums without double counting.
    for event in prof.events():
        if event.cpu_parent is None and event.name.startswith("aten::") and event.name not in TOP_LEVEL_SKIP:
            totals[category(event.name, event.input_shapes, model.config.vocab_size)] += event.cpu_time_total / 1e6
    in_ops = sum(totals.values())
    totals["python/framework overhead"] = max(0.0, wall - in_ops)
    row = {"batch": batch, "prompt": prompt, "cache": cache_kind, "step_ms": 1000 * wall / steps}
    row |= {f"{name}_ms": 1000 * value / steps for name, value in totals.items()}
    row |= {f"{name}_share": value / wall for name, value in totals.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--cache", default="static", choices=["static", "dynamic"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "bfloat16")
    rows = [profile_step(model, int(b), args.prompt, args.steps, args.cache) for b in args.batches.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    names = ["linear (weights)", "lm_head", "attention", "other ops", "python/framework overhead"]
    print("| batch | step ms | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for row in rows:
        cells = [f"{row.get(n + '_ms', 0):.1f} ms ({100 * row.get(n + '_share', 0):.0f}%)" for n in names]
        print(f"| {row['batch']} | {row['step_ms']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
