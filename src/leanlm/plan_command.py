"""``leanlm plan`` (parser + run; torch-free until run): probe, choose per-layer KV heads and the run-time policy for a byte budget, write a recipe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

POLICIES = ("quantized", "heavy_hitter+int4:group=64")


def add_parser(sub, add_model_args, positive_int) -> argparse.ArgumentParser:
    """The ``plan`` sub-command; ``cli.py`` passes its shared helpers in (no import back into cli: no cycle)."""
    plan = sub.add_parser("plan", help="choose per-layer KV heads and a cache policy for a KV byte budget; writes a recipe",
                          description="KL probes on WikiText-2 validation (each layer merged alone; each run-time "
                                      "policy alone), then the least estimated KL that meets --kv-budget.")
    add_model_args(plan)
    plan.add_argument("--kv-budget", type=float, default=0.125,
                      help="fraction of the original bf16 KV-cache bytes (default: %(default)s)")
    plan.add_argument("--out", type=Path, required=True, help="directory for plan.json and recipe.yaml (must not exist)")
    plan.add_argument("--method", default="calibrated", choices=["calibrated", "mean"], help="share_kv merge to probe")
    plan.add_argument("--policies", default=",".join(POLICIES), help="run-time policies to probe, comma-separated")
    plan.add_argument("--policy-budgets", default="0.5,0.25,0.125", help="their budgets, comma-separated")
    plan.add_argument("--probe-samples", type=positive_int, default=4, help="validation windows for the layer probes")
    plan.add_argument("--probe-len", type=positive_int, default=256, help="tokens per layer-probe window")
    plan.add_argument("--probe-context", type=positive_int, default=2048,
                      help="policy probes: context tokens; use the context you will run at, since a policy's sizing "
                           "(e.g. the bits quantized picks) depends on it (default: %(default)s)")
    plan.epilog = ("examples:\n  leanlm plan --kv-budget 0.125 --out runs/plan-0.125      # then: leanlm run "
                   "runs/plan-0.125/recipe.yaml\n  leanlm plan --kv-budget 0.25 --method mean --policies quantized --out runs/plan")
    return plan


def run(args) -> int:
    from leanlm.analyze.kv_plan import choose_plan, layer_probes, plan_recipe, policy_probes
    from leanlm.data import calibration_batches
    from leanlm.errors import LeanLMError
    from leanlm.models import load_model, load_tokenizer
    from leanlm.report import atomic_write_json

    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; choose a new output directory")
    if not 0 < args.kv_budget <= 1:
        raise LeanLMError(f"--kv-budget is a fraction of the full cache in (0, 1], got {args.kv_budget}")
    budgets = [float(b) for b in args.policy_budgets.split(",") if b]
    model, tok = load_model(args.model, args.dtype, device=args.device), load_tokenizer(args.model)
    batches = calibration_batches(tok, num_samples=args.probe_samples, seq_len=args.probe_len, batch_size=2)
    layers = layer_probes(model, batches, args.method)
    policies = policy_probes(model, tok, [p for p in args.policies.split(",") if p], budgets, context=args.probe_context)
    plan = choose_plan(layers, policies, args.kv_budget, args.method)
    args.out.mkdir(parents=True)
    atomic_write_json(args.out / "plan.json", {"plan": plan.to_dict(), "layer_probes": [{str(k): v for k, v in row.items()}
                                                                                         for row in layers],
                                               "policy_probes": [vars(p) for p in policies], "model": args.model})
    (args.out / "recipe.yaml").write_text(plan_recipe(plan, args.model))
    print(f"KV heads per layer {plan.kv_heads_per_layer}, run-time policy {plan.policy} @ {plan.policy_budget}: "
          f"{plan.bytes_fraction:.4f} of the cache bytes, estimated KL {plan.estimated_kl:.4f}; wrote {args.out}/recipe.yaml")
    return 0
