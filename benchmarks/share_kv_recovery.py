"""Benchmark: MQA by share_kv (mean vs calibrated merge), before and after recovery, on the real model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/share_kv_recovery.py --out runs/kv/share_kv_recovery.json \
        --methods mean,calibrated --local-steps 40 --kd-cpu-minutes 2 --save-dir runs/kv/share_kv_models

For each merge method: SmolLM2-135M (bf16) -> ``share_kv`` (kv_heads 1: 3x fewer KV bytes) -> perplexity
(WikiText-2 test and Botchan, out of domain) -> layer-local fit (every attention module's q/k/v/o fitted
with Adam to the original attention's outputs on the original's inputs, WikiText-2 validation windows)
-> perplexity -> LoRA + KD from the original (WikiText-2 validation, a process-CPU budget) -> merge ->
perplexity. Training cost is process CPU time (``time.process_time``, honest on a shared machine) and
tokens; perplexity ratios are against the original model under the same recorded protocol.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from leanlm.data import calibration_batches
from leanlm.errors import LeanLMError
from leanlm.evaluate.perplexity import PerplexityProtocol, perplexity
from leanlm.models import arch_of, load_model, load_tokenizer
from leanlm.recover import DistillConfig, LoraSettings, add_lora, distill, merge_lora, training_windows
from leanlm.recover.layer_local import LocalFitConfig, capture_attention_io, fit_module
from leanlm.report import atomic_write_json, git_info, versions
from leanlm.transforms import merge_kv_heads, save_compact

SPLITS = ("test", "botchan")


def evaluate(model, tok, args) -> dict:
    """Perplexity on each split under the run's protocol: {split: {"ppl", "protocol"}}."""
    out = {}
    for split in SPLITS:
        result = perplexity(model, tok, PerplexityProtocol(split=split, max_tokens=args.eval_tokens))
        out[split] = {"ppl": result.perplexity, "protocol": result.protocol}
    return out


def ratios(scores: dict, base: dict) -> dict:
    return {split: scores[split]["ppl"] / base[split]["ppl"] for split in SPLITS}


def layer_local(student, io: dict, args) -> dict:
    """Fit every attention module of ``student`` to the original's captured outputs; errors and CPU time."""
    config = LocalFitConfig(steps=args.local_steps, lr=args.local_lr, batch_calls=1)
    began, errors = time.process_time(), []
    for layer, record in sorted(io.items()):
        fit = fit_module(arch_of(student).attention(layer).module, record, config)
        errors.append({"layer": layer, "before": fit.before, "after": fit.after,
                       "heldout_before": fit.heldout_before, "heldout_after": fit.heldout_after})
    return {"cpu_seconds": time.process_time() - began, "errors": errors, "steps_per_layer": args.local_steps,
            "token_passes_per_layer": args.local_steps * args.batch_size * args.seq_len}


def kd(student, teacher, tok, args):
    """LoRA + KD from the original on WikiText-2 validation for ``--kd-cpu-minutes`` of process CPU."""
    windows = training_windows(tok, args.seq_len)
    config = DistillConfig(steps=args.kd_max_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.kd_lr,
                           warmup_steps=5, alpha=args.alpha, temperature=args.temperature, checkpoint_every=0,
                           max_cpu_minutes=args.kd_cpu_minutes)
    began = time.process_time()
    peft = add_lora(student, LoraSettings(rank=args.lora_rank, include_mlp=args.lora_mlp))
    with tempfile.TemporaryDirectory() as tmp:
        result = distill(peft, teacher, windows, config, out_dir=tmp)
    merged = merge_lora(peft)
    info = {"cpu_seconds": time.process_time() - began, "steps": result.steps_done,
            "tokens": result.steps_done * result.tokens_per_step, "wall_seconds": result.seconds,
            "final_loss": result.losses[-1] if result.losses else None,
            "config": {k: getattr(config, k) for k in ("batch_size", "seq_len", "lr", "alpha", "temperature",
                                                        "max_cpu_minutes")},
            "lora": {"rank": args.lora_rank, "include_mlp": args.lora_mlp}}
    return merged, info


def run_method(method: str, teacher, tok, calibration, base: dict, args, checkpoint=lambda row: None) -> dict:
    """One merge method through every stage; ``checkpoint(row)`` after each, so a stopped run keeps its stages."""
    began = time.process_time()
    student = copy.deepcopy(teacher)
    report = merge_kv_heads(student, args.kv_heads, method, calibration)
    merge_cpu = time.process_time() - began
    row = {"method": method, "kv_heads": args.kv_heads, "transform": report, "merge_cpu_seconds": merge_cpu}
    row["merged"] = evaluate(student, tok, args)
    row["merged_ratio"] = ratios(row["merged"], base)
    log(method, "merged", row["merged_ratio"])
    checkpoint(row)
    capture_cpu = 0.0
    if args.local_steps:
        began_capture = time.process_time()
        windows = training_windows(tok, args.seq_len)[: args.local_windows]
        io = capture_attention_io(teacher, windows, range(len(arch_of(teacher).layers)), args.batch_size)
        capture_cpu = time.process_time() - began_capture
        row["layer_local"] = layer_local(student, io, args) | {"capture_cpu_seconds": capture_cpu}
        del io  # the captured activations are not needed by KD (and hold GBs)
        row["local"] = evaluate(student, tok, args)
        row["local_ratio"] = ratios(row["local"], base)
        log(method, "layer-local", row["local_ratio"])
        checkpoint(row)
    if args.kd_cpu_minutes:
        student, row["kd"] = kd(student, teacher, tok, args)
        row["recovered"] = evaluate(student, tok, args)
        row["recovered_ratio"] = ratios(row["recovered"], base)
        log(method, "recovered", row["recovered_ratio"])
    local_cpu = row.get("layer_local", {}).get("cpu_seconds", 0.0) + (capture_cpu if args.local_steps else 0.0)
    row["training_cpu_minutes"] = (merge_cpu + local_cpu + row.get("kd", {}).get("cpu_seconds", 0.0)) / 60
    row["training_tokens"] = row.get("kd", {}).get("tokens", 0) + (args.local_windows * args.seq_len if args.local_steps else 0)
    if args.save_dir:
        row["model_dir"] = str(save_compact(student, tok, args.save_dir / f"mqa-{method}"))
    return row


def stages(row: dict) -> list[tuple[str, float, dict]]:
    """(stage, cumulative training CPU minutes, ratios) of one method: merged, layer-local, recovered."""
    merge = row["merge_cpu_seconds"] / 60
    out = [("merged", merge, row["merged_ratio"])]
    if "local_ratio" in row:
        merge += (row["layer_local"]["cpu_seconds"] + row["layer_local"]["capture_cpu_seconds"]) / 60
        out.append(("layer-local", merge, row["local_ratio"]))
    if "recovered_ratio" in row:
        out.append(("LoRA+KD", merge + row["kd"]["cpu_seconds"] / 60, row["recovered_ratio"]))
    return out


def recovery_plot(result: dict, path: Path) -> None:
    """Perplexity ratio vs training CPU minutes, one line per method and split (log y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result["rows"]:
        points = stages(row)
        for split, style in zip(SPLITS, ("-", "--")):
            ax.plot([p[1] for p in points], [p[2][split] for p in points], style, marker="o",
                    label=f"{row['method']} ({'WikiText-2 test' if split == 'test' else 'Botchan, out of domain'})")
    ax.axhline(1.10, color="grey", linewidth=0.8, linestyle=":")
    ax.set(yscale="log", xlabel="training CPU minutes (process time: merge, layer-local fit, LoRA+KD)",
           ylabel="perplexity / original", title=f"MQA (kv_heads {result['rows'][0]['kv_heads']}) on SmolLM2-135M")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log(method: str, stage: str, ratio: dict) -> None:
    print(f"{method:>10} {stage:>12}: " + "  ".join(f"{k} x{v:.4f}" for k, v in ratio.items()), file=sys.stderr, flush=True)


def combine(paths: list[Path], out: Path) -> int:
    """One result from runs of single methods (run side by side as separate processes)."""
    runs = [json.loads(p.read_text()) for p in paths]
    if any(r["protocol"]["eval"] != runs[0]["protocol"]["eval"] for r in runs):
        raise LeanLMError("the runs used different evaluation protocols: their ratios cannot share a table")
    result = runs[0] | {"rows": [row for r in runs for row in r["rows"]],
                        "combined_from": [{"file": str(p), "command": r["protocol"]["command"],
                                           "baseline": r["baseline"]} for p, r in zip(paths, runs)]}
    atomic_write_json(out, result)
    recovery_plot(result, out.with_name(out.stem + "-curve.png"))
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write (never overwritten)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", type=lambda s: s.split(","), default=["mean", "calibrated"])
    p.add_argument("--kv-heads", type=int, default=1, help="KV heads every layer keeps (1 = MQA)")
    p.add_argument("--eval-tokens", type=int, default=8192, help="first N tokens of each split (sliding 1024/512)")
    p.add_argument("--calibration-samples", type=int, default=16, help="validation windows of 256 for the merge")
    p.add_argument("--local-windows", type=int, default=16, help="validation windows captured for the layer-local fit")
    p.add_argument("--local-steps", type=int, default=40, help="Adam steps per attention layer (0: skip)")
    p.add_argument("--local-lr", type=float, default=5e-4)
    p.add_argument("--kd-cpu-minutes", type=float, default=2.0, help="process CPU budget of LoRA + KD (0: skip)")
    p.add_argument("--kd-max-steps", type=int, default=10_000)
    p.add_argument("--kd-lr", type=float, default=5e-4)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the KD term (the rest: CE on the labels)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-mlp", action="store_true")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-dir", type=Path, default=None, help="save each recovered model here (mqa-METHOD)")
    p.add_argument("--replot", action="store_true", help="only redraw --out's curve plot from its JSON")
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="only join these runs' rows (same baseline protocol, checked) into --out, with its plot")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.replot:
        recovery_plot(json.loads(args.out.read_text()), args.out.with_name(args.out.stem + "-curve.png"))
        return 0
    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
    if args.combine:
        return combine(args.combine, args.out)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, tok = load_model(args.model, "bfloat16"), load_tokenizer(args.model)
    teacher.requires_grad_(False)
    base = evaluate(teacher, tok, args)
    calibration = calibration_batches(tok, num_samples=args.calibration_samples, seq_len=256, batch_size=4)
    result = {"protocol": {"model": args.model, "dtype": "bfloat16", "threads": args.threads,
                           "eval": {s: base[s]["protocol"] for s in SPLITS},
                           "training_data": "WikiText-2 validation", "command": " ".join(sys.argv)},
              "baseline": base, "rows": [], "versions": versions(), "git": git_info()}
    partial = args.out.with_name(args.out.stem + ".partial.json")
    for method in args.methods:
        done = list(result["rows"])
        row = run_method(method, teacher, tok, calibration, base, args,
                         checkpoint=lambda row: atomic_write_json(partial, result | {"rows": done + [row]}))
        result["rows"].append(row)
        atomic_write_json(partial, result)
    atomic_write_json(args.out, result)
    recovery_plot(result, args.out.with_name(args.out.stem + "-curve.png"))
    partial.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LeanLMError as err:
        print(f"share_kv_recovery: error: {err}", file=sys.stderr)
        sys.exit(2)
