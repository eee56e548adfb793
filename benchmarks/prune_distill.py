"""Benchmark: the default prune + LoRA/KD recipe on the real model, with speed ratios measured side by side.

    .venv/bin/python benchmarks/prune_distill.py --out prune_distill.json --with-reference

Runs `recipes/smollm2-prune25.yaml` (or --recipe) into a run directory, then times the original
and the recovered model alternately in this one process (the machine is shared and noisy: only
ratios measured together mean anything), and writes one JSON file with the ratios and protocol.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.evaluate import SpeedConfig, measure_speed
from leanlm.evaluate.side_by_side import alternate, median_ratio
from leanlm.models import load_model
from leanlm.pipeline import eval_copy, run_recipe
from leanlm.recipe import load_recipe
from leanlm.report import atomic_write_json, git_info, versions


def side_by_side_speed(original, candidate, rounds: int = 3) -> dict:
    """Alternate A, B, A, B ... so drifts in machine load hit both; medians per model."""
    config = SpeedConfig(warmup=1, repeats=1)
    runs = alternate({"original": lambda: measure_speed(original, config),
                      "candidate": lambda: measure_speed(candidate, config)}, rounds)
    ratios = {}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        for sub in getattr(runs["original"][0], key):
            series = {name: [getattr(r, key)[sub] for r in runs[name]] for name in runs}
            both = median_ratio(series["original"], series["candidate"])
            ratios[f"{key}:{sub}"] = {"original": both["base"], "candidate": both["candidate"], "ratio": both["ratio"]}
    return ratios


def ratio(results: dict, section: str, key: str = "perplexity", base: str = "baseline") -> float | None:
    if not results.get(section) or not results.get(base) or results[section].get(key) is None:
        return None
    return results[section][key] / results[base][key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--recipe", type=Path, default=Path("recipes/smollm2-prune25.yaml"))
    parser.add_argument("--run-dir", type=Path, help="run directory (default runs/bench-<recipe>-TIME)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --run-dir")
    parser.add_argument("--with-reference", action="store_true",
                        help="also train the unpruned model with the same LoRA + CE budget (domain-adaptation reference)")
    parser.add_argument("--speed-rounds", type=int, default=3, help="alternating speed rounds (median)")
    args = parser.parse_args()
    try:
        if args.out.exists():
            raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
        recipe = load_recipe(args.recipe)
        run_dir = args.run_dir or Path("runs") / f"bench-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        results = run_recipe(recipe, run_dir, resume=args.resume, with_reference=args.with_reference)
        original = eval_copy(load_model(recipe.model, "float32", recipe.device), recipe.dtype)
        candidate = eval_copy(load_model(str(run_dir / "model"), "float32", recipe.device), recipe.dtype)
        speed = side_by_side_speed(original, candidate, args.speed_rounds)
    except LeanLMError as err:
        print(f"prune_distill: error: {err}", file=sys.stderr)
        return 2
    base = results["baseline"]
    pruned = results["pruned"] or base  # a recipe without transforms: recovery of the original
    rec = results["recovered"] or pruned
    main_training = results["training"].get("lora_kd") or next(iter(results["training"].values()), {})
    report = {
        "ppl_baseline": base["perplexity"],
        "ppl_pruned": pruned["perplexity"],
        "ppl_recovered": rec["perplexity"],
        "ppl_ratio_pruned": ratio(results, "pruned"),
        "ppl_ratio_recovered": ratio(results, "recovered"),
        "ppl_ratio_kd_oproj": ratio(results, "kd_oproj"),
        "ppl_reference": (results.get("reference") or {}).get("perplexity"),
        "ppl_ratio_recovered_vs_reference": ratio(results, "recovered", base="reference"),
        "ood_ppl_ratio_pruned": ratio(results, "pruned", "ood_perplexity"),
        "ood_ppl_ratio_recovered": ratio(results, "recovered", "ood_perplexity"),
        "ood_ppl_ratio_reference": ratio(results, "reference", "ood_perplexity"),
        "ood_text": base.get("ood_protocol", {}).get("text_source"),
        "heads_removed_fraction": results.get("heads_removed_fraction"),  # None without a prune_heads transform
        "kv_bytes_ratio": rec["kv_bytes_per_token"] / base["kv_bytes_per_token"],
        "params_ratio": rec["params"] / base["params"],
        "prefill_speed_ratio": speed["prefill_tokens_per_s:2048"]["ratio"],
        "decode_speed_ratio": speed["decode_tokens_per_s:1"]["ratio"],
        "speed_side_by_side": speed,
        "train_minutes": main_training.get("train_minutes"),
        "train_steps": main_training.get("steps"),
        "training": results["training"],
        "protocol": base["protocol"],
        "ood_protocol": base.get("ood_protocol"),
        "recipe": results["recipe"],
        "run_dir": str(run_dir),
        "command": " ".join(sys.argv),
        "versions": versions(),
        "git": git_info(),
    }
    atomic_write_json(args.out, report)
    print({k: v for k, v in report.items() if k.startswith(("ppl_ratio", "kv_", "params_", "heads_", "prefill_", "decode_", "train_"))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
