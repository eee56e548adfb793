"""Benchmark: structural KV savings (fewer KV heads; latent rows to come), alone and under run-time cache policies.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_structure.py --out runs/kv/kv_structure.json \
        --recovery runs/kv/share_kv_recovery.json

The rows have `benchmarks/kv_rows.py`'s schema (its `row`, table, plot and target helpers are
imported, not copied), on the same continuation protocol (WikiText-2 test, back-to-back windows of
2,048 context + 128 scored tokens): a structural model (e.g. MQA from ``share_kv``) runs with its own
full cache and with each run-time policy (a structural model can carry a cache policy too), and is
scored against the *original* model's uncompressed run, so ``ppl_ratio``, ``kl`` and the "× fewer"
factor are all relative to the original bf16 cache. Bytes are measured from the cache after the
prefill. Every row carries the structure's training cost (process CPU minutes and tokens; 0 for a
merge without training). Writes FILE.json, FILE.md and FILE-pareto.png.

Adding a structure (e.g. the latent KV rows): one entry in ``STRUCTURES`` (a name and a builder
``(teacher, tokenizer, args) -> (model, info)``), or a saved model through ``--model NAME=DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kv_rows  # noqa: E402  (the row schema, table, plot and targets shared with kv_pareto)

from leanlm.data import calibration_batches  # noqa: E402
from leanlm.errors import LeanLMError  # noqa: E402
from leanlm.evaluate.kv import ContinuationProtocol, continuation_perplexity, continuation_reference, continuation_windows  # noqa: E402
from leanlm.kvcache import make_policy  # noqa: E402
from leanlm.models import load_model, load_tokenizer  # noqa: E402
from leanlm.report import atomic_write_json, git_info, versions  # noqa: E402
from leanlm.transforms import merge_kv_heads  # noqa: E402

POLICIES = ["quantized", "heavy_hitter+int4:group=64"]
Builder = Callable[[torch.nn.Module, object, argparse.Namespace], tuple[torch.nn.Module, dict]]


def share_kv_builder(method: str) -> Builder:
    def build(teacher, tok, args):
        began = time.process_time()
        model = copy.deepcopy(teacher)
        calibration = calibration_batches(tok, num_samples=16, seq_len=256, batch_size=4)
        report = merge_kv_heads(model, 1, method, calibration)
        return model, {"transform": report, "training_cpu_minutes": (time.process_time() - began) / 60,
                       "training_tokens": 0, "training": f"share_kv {method} merge only (no training)"}
    return build


# name -> builder. The latent-KV structures go here (e.g. "latent-4x": load or build the latent_kv model).
STRUCTURES: dict[str, Builder] = {
    "mqa-mean": share_kv_builder("mean"),
    "mqa-calibrated": share_kv_builder("calibrated"),
}


def saved_structures(args) -> dict[str, Builder]:
    """Saved models: ``--model NAME=DIR`` and every recovered model a ``--recovery`` JSON lists."""
    found: dict[str, tuple[str, dict]] = {}
    for spec in args.model_dirs:
        name, _, path = spec.partition("=")
        if not path:
            raise LeanLMError(f"--model wants NAME=DIR, got '{spec}'")
        found[name] = (path, {"training": "saved model", "training_cpu_minutes": None, "training_tokens": None})
    for recovery in args.recovery:
        for r in json.loads(recovery.read_text())["rows"]:
            if r.get("model_dir"):
                found[f"mqa-{r['method']}-recovered"] = (r["model_dir"], {
                    "training": "layer-local fit + LoRA/KD (benchmarks/share_kv_recovery.py)",
                    "training_cpu_minutes": r["training_cpu_minutes"], "training_tokens": r["training_tokens"],
                    "recovery_ratio": r.get("recovered_ratio")})
    return {name: (lambda teacher, tok, args, path=path, info=info: (load_model(path, "bfloat16"), info))
            for name, (path, info) in found.items()}


def plan_structure(path: Path) -> tuple[str, Builder, list]:
    """A ``leanlm plan`` result: its per-layer KV heads (merged here) and its own policy and budget."""
    plan = json.loads(path.read_text())["plan"]

    def build(teacher, tok, args):
        began = time.process_time()
        model = copy.deepcopy(teacher)
        calibration = calibration_batches(tok, num_samples=16, seq_len=256, batch_size=4)
        report = merge_kv_heads(model, plan["kv_heads_per_layer"], plan["method"], calibration)
        return model, {"transform": report, "plan": plan, "training_tokens": 0,
                       "training_cpu_minutes": (time.process_time() - began) / 60, "training": "leanlm plan, merge only"}
    runs = [(None, 1.0)] + ([] if plan["policy"] == "none" else [(plan["policy"], plan["policy_budget"])])
    return f"plan-{plan['budget']}", build, runs


def structure_rows(name: str, model, info: dict, tok, args, refs: dict, runs: list | None = None) -> list[dict]:
    """The structure with its own full cache, then under each policy and budget (or the given ``runs``)."""
    rows = []
    runs = runs or [(None, 1.0)] + [(policy, budget) for policy in args.policies for budget in args.budgets]
    for policy, budget in runs:
        factory = None if policy is None else (lambda n, p=policy, b=budget: make_policy(p, b, n, tok, model))
        began = time.perf_counter()
        cont = continuation_perplexity(model, tok, factory, refs["cont_protocol"], reference=refs["cont"])
        method = name if policy is None else f"{name} × {policy}"
        described = {"policy": "none", "cache": "DynamicCache"} if policy is None else factory(args.context).describe()
        rows.append(kv_rows.row(method, "leanlm", budget, cont, refs["cont"].result, structure=name, policy=described,
                                  seconds=time.perf_counter() - began, **info))
        print(f"{method:>45} @ {budget:<5}: ppl x{rows[-1]['ppl_ratio']:.4f}  kl {cont.kl:.4f}  "
              f"{cont.bytes_per_token:,.0f} B/token", file=sys.stderr, flush=True)
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write (never overwritten)")
    p.add_argument("--model", default="smollm2-135m", help="the original model")
    p.add_argument("--structures", type=lambda s: s.split(","), default=list(STRUCTURES),
                   help=f"built-in structures to build ({', '.join(STRUCTURES)}); '' for none")
    p.add_argument("--model-dir", dest="model_dirs", action="append", default=[], metavar="NAME=DIR",
                   help="a saved structural model to add (repeatable)")
    p.add_argument("--recovery", type=Path, action="append", default=[],
                   help="a share_kv_recovery.py JSON: add its recovered models (repeatable)")
    p.add_argument("--policies", nargs="*", default=POLICIES, help="run-time policies each structure also runs with")
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.125],
                   help="policy budgets, as fractions of the *structure's* full cache")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--windows", type=int, default=8, help="windows (kv_pareto's rows used 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replot", action="store_true", help="only rewrite --out's table and plot from its JSON")
    p.add_argument("--plan", type=Path, default=None, help="a `leanlm plan` plan.json: its structure with its policy")
    p.add_argument("--add-to", type=Path, default=None,
                   help="keep an earlier kv_structure JSON's rows (same protocol, checked) and add this run's to --out")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.replot:
        write_outputs(json.loads(args.out.read_text()), args.out)
        return 0
    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
    unknown = [s for s in args.structures if s and s not in STRUCTURES]
    if unknown:
        raise LeanLMError(f"unknown structure(s) {unknown}: choose from {', '.join(STRUCTURES)}")
    torch.set_num_threads(args.threads)
    teacher, tok = load_model(args.model, "bfloat16"), load_tokenizer(args.model)
    protocol = ContinuationProtocol(context=args.context, continuation=args.continuation, windows=args.windows)
    refs = {"cont_protocol": protocol, "cont": continuation_reference(teacher, tok, protocol)}
    earlier = json.loads(args.add_to.read_text()) if args.add_to else None
    if earlier is None:
        baseline_cont = continuation_perplexity(teacher, tok, None, protocol, reference=refs["cont"])
        baseline = kv_rows.row("full", "leanlm", 1.0, baseline_cont, refs["cont"].result,
                                 policy={"policy": "none", "cache": "DynamicCache"})
    else:
        baseline = earlier["baseline"]  # the same windows (checked below): its measured full-cache row
    builders = {s: STRUCTURES[s] for s in args.structures if s} | saved_structures(args)
    runs: dict[str, list] = {}
    if args.plan:
        name, build, runs[name] = plan_structure(args.plan)
        builders[name] = build
    result = {"protocol": {"model": args.model, "continuation": refs["cont"].result.protocol,
                           "continuation_windows_sha256": kv_rows.windows_digest(continuation_windows(tok, protocol)),
                           "budgets_relative_to": "each structure's own full cache", "command": " ".join(sys.argv)},
              "baseline": baseline, "rows": [], "versions": versions(), "git": git_info()}
    if earlier is not None:
        if earlier["protocol"]["continuation_windows_sha256"] != result["protocol"]["continuation_windows_sha256"]:
            raise LeanLMError(f"'{args.add_to}' was measured on other windows than --context/--continuation/--windows give")
        result["rows"] = [r for r in earlier["rows"] if r.get("structure") not in builders]
        result["added_to"] = {"file": str(args.add_to), "command": earlier["protocol"]["command"]}
    partial = args.out.with_name(args.out.stem + ".partial.json")
    for name, build in builders.items():
        model, info = build(teacher, tok, args)
        result["rows"] += structure_rows(name, model.eval(), info, tok, args, refs, runs.get(name))
        atomic_write_json(partial, result)
        del model
    result["targets"] = structure_targets(result["rows"], baseline["bytes_per_token"])
    write_outputs(result, args.out)
    partial.unlink(missing_ok=True)
    return 0


def write_outputs(result: dict, out: Path) -> None:
    """kv_pareto's JSON, table and plot (log y up to the worst row: unrecovered structures sit far above 1),
    plus the training-cost table."""
    for r in result["rows"]:
        r["flag"] = kv_rows.retrieval_flag(r)
    atomic_write_json(out, result)
    out.with_suffix(".md").write_text(kv_rows.markdown(result) + training_table(result["rows"]))
    worst = max([r["ppl_ratio"] for r in result["rows"] if r.get("ppl_ratio")] + [1.6])
    kv_rows.pareto_plot(result, out.with_name(out.stem + "-pareto.png"), top=worst * 1.2, log_y=True)
    print(out.with_suffix(".md").read_text())


def training_table(rows: list[dict]) -> str:
    """What each structure cost to make: process CPU minutes and training tokens."""
    lines = ["", "| structure | training | CPU minutes | tokens |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["structure"] for r in rows if r.get("structure")):
        r = next(r for r in rows if r.get("structure") == name)
        minutes = r.get("training_cpu_minutes")
        lines.append(f"| {name} | {r.get('training', '')} | {'—' if minutes is None else f'{minutes:.2f}'} | "
                     f"{r.get('training_tokens') if r.get('training_tokens') is not None else '—'} |")
    return "\n".join(lines) + "\n"


def structure_targets(rows: list[dict], baseline_bytes: float) -> dict:
    """The issue's targets: MQA (≥3× fewer) ≤ 1.10, structure × run-time at ≥16× fewer ≤ 1.10 (goals 1.05)."""
    out = {}
    for label, factor in (("at_3x_fewer_bytes", 3), ("at_16x_fewer_bytes", 16)):
        fits = [r for r in rows if r.get("ppl_ratio") is not None and r["bytes_per_token"] <= baseline_bytes / factor * 1.001]
        best = min(fits, key=lambda r: r["ppl_ratio"], default=None)
        out[label] = None if best is None else {
            "method": best["method"], "budget": best["budget"], "ppl_ratio": best["ppl_ratio"],
            "bytes_per_token": best["bytes_per_token"], "target": 1.10, "goal": 1.05, "met": best["ppl_ratio"] <= 1.10}
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LeanLMError as err:
        print(f"kv_structure: error: {err}", file=sys.stderr)
        sys.exit(2)
