"""Benchmark: which recovery generalises? Variants of prune-25%-heads + recovery at one equal CPU budget.

    S="nice -n 10 .venv/bin/python benchmarks/recovery_sweep.py --work runs/sweep --teacher-tokens 12000"
    OMP_NUM_THREADS=1 $S --prepare --no-metrics --variants recipe,query_global_kl_teacher --out runs/sweep/prep.json
    # then, in parallel processes sharing --work (each ~3.8 GB RSS: mind the memory):
    OMP_NUM_THREADS=1 $S --budget 2 --variants recipe,kl_only --out runs/sweep/pa.json
    OMP_NUM_THREADS=1 $S --budget 2 --variants local_kl_mix,reference_mix --reference-steps-of local_kl_mix@2 \\
        --save-models --out runs/sweep/pc.json
    # the winner at the full budget (model saved), then its same-steps reference on the unpruned model:
    OMP_NUM_THREADS=1 $S --budget 20 --variants local_kl_mix --save-models --out runs/sweep/final.json
    OMP_NUM_THREADS=1 $S --budget 20 --variants reference_mix --reference-steps-of local_kl_mix@20 --out runs/sweep/ref.json

Every variant starts from the same KL-scored head selection (scores computed once, cached in --work),
pruned at the variant's granularity and layout, then: an optional layer-local stage (each pruned
layer's attention o_proj fitted to the teacher's attention output on calibration windows, least
squares, ``leanlm.recover.local_stage``), then LoRA (or o_proj-only) + KD on the variant's data.
The budget is *process CPU time* (``time.process_time``; the layer-local stage counts in it), so it is
honest on a shared machine; the cosine schedule is sized to the steps the budget buys, from a timed
trial step of that very variant. Every model is measured with the same protocol: perplexity on
WikiText-2 test (in domain for WikiText-trained variants) and on Botchan / Pride and Prejudice (out of
domain for every variant), non-overlapping windows, bfloat16. Each finished variant is saved as
``--work/variants/NAME@BUDGET.json`` (a rerun skips it); --out gathers them all with the ratios.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from leanlm.analyze import SCORERS, HeadScores
from leanlm.data import calibration_batches
from leanlm.errors import LeanLMError
from leanlm.evaluate import PerplexityProtocol, perplexity
from leanlm.models import ModelSpec, load_model, load_tokenizer
from leanlm.models.compact import load_compact, save_compact
from leanlm.models.widen import widened_linears
from leanlm.recover import DistillConfig, LoraSettings, add_lora, distill, merge_lora, train_only, training_windows
from leanlm.recover.local_stage import LocalStageConfig, local_stage
from leanlm.recover.losses import kd_loss
from leanlm.report import atomic_write_json, git_info, versions
from leanlm.transforms.prune_heads import prune_heads, removed_fraction, select_heads

MODEL = "smollm2-135m"
TEACHER_DATA = "teacher"  # leanlm.data.sources: text sampled from the original model, cached


@dataclass
class Variant:
    """One recovery recipe: what is pruned, on what data, with which loss and adapters."""

    granularity: str = "kv_group"  # query | kv_group
    layout: str = "global"  # global | uniform
    data: str = "wikitext"  # a leanlm data spec: wikitext | teacher | teacher@0.5,wikitext@0.5 | ...
    alpha: float = 0.5  # KD weight (1 = KL only; 0.5 = KL + CE, today's recipe)
    temperature: float = 2.0
    lora_rank: int = 16
    targets: str = "attn+mlp"  # attn | attn+mlp | o_proj (train_only o_proj, no LoRA)
    local: str | None = None  # None | lstsq | adam: the layer-local stage first
    lr: float = 5e-4
    reference: bool = False  # the unpruned model (same data and steps as --reference-steps-of)


MIX = f"{TEACHER_DATA}@0.5,wikitext@0.5"
VARIANTS: dict[str, Variant] = {
    "recipe": Variant(),  # today's default: KL + CE on WikiText-2 validation, LoRA r16 attention + MLP
    "kl_only": Variant(alpha=1.0),
    "kl_teacher": Variant(alpha=1.0, data=TEACHER_DATA),
    "klce_teacher": Variant(alpha=0.5, data=TEACHER_DATA),
    "kl_mix": Variant(alpha=1.0, data=MIX),
    "local_kl_teacher": Variant(alpha=1.0, data=TEACHER_DATA, local="lstsq"),
    "local_kl_mix": Variant(alpha=1.0, data=MIX, local="lstsq"),
    "local_only": Variant(local="lstsq", targets="none"),
    "r8_attn_teacher": Variant(alpha=1.0, data=TEACHER_DATA, lora_rank=8, targets="attn"),
    "r32_teacher": Variant(alpha=1.0, data=TEACHER_DATA, lora_rank=32),
    "oproj_teacher": Variant(alpha=1.0, data=TEACHER_DATA, targets="o_proj"),
    "lr1e3_kl_teacher": Variant(alpha=1.0, data=TEACHER_DATA, lr=1e-3),
    "query_global_kl_teacher": Variant(alpha=1.0, data=TEACHER_DATA, granularity="query"),
    "query_global_lr2e3_kl_teacher": Variant(alpha=1.0, data=TEACHER_DATA, granularity="query", lr=2e-3),
    "query_global_lr4e3_kl_teacher": Variant(alpha=1.0, data=TEACHER_DATA, granularity="query", lr=4e-3),
    "kvgroup_uniform_kl_teacher": Variant(alpha=1.0, data=TEACHER_DATA, layout="uniform"),
    "query_uniform_kl_teacher": Variant(alpha=1.0, data=TEACHER_DATA, granularity="query", layout="uniform"),
    # References: the unpruned model, LoRA + CE only (alpha 0), same data and steps as a named variant. KL
    # against itself is exactly 0 (no gradient), so CE is what measures how far this data pulls a model.
    "reference_teacher": Variant(alpha=0.0, data=TEACHER_DATA, reference=True),
    "reference_teacher_lr2e3": Variant(alpha=0.0, data=TEACHER_DATA, reference=True, lr=2e-3),
    "reference_mix": Variant(alpha=0.0, data=MIX, reference=True),
    "reference_wikitext": Variant(alpha=0.0, reference=True),
}
for _name, _v in list(VARIANTS.items()):  # the layer-local stage on top of each granularity, too
    if _name.endswith("_kl_teacher") and ("query" in _name or "uniform" in _name):
        VARIANTS["local_" + _name] = dataclasses.replace(_v, local="lstsq")


# ------------------------------------------------------------------------------ evaluation


def protocols(texts: list[str], tokens: int, window: int) -> dict[str, PerplexityProtocol]:
    out = {}
    for name in texts:
        if name == "wikitext":
            out[name] = PerplexityProtocol("test", "nonoverlap", window, window, tokens)
        else:  # botchan, pride (built in) or a UTF-8 file
            out[name] = PerplexityProtocol("test", "nonoverlap", window, window, tokens, text=name)
    return out


def measure(model, tokenizer, protos: dict[str, PerplexityProtocol]) -> dict:
    model = copy.deepcopy(model).to(torch.bfloat16).eval()
    results = {}
    for name, proto in protos.items():
        r = perplexity(model, tokenizer, proto)
        results[name] = {"perplexity": r.perplexity, "tokens": r.tokens_scored}
    return results


# ------------------------------------------------------------------------------ pruning (cached)


def kl_scores(work: Path, teacher, tokenizer) -> HeadScores:
    path = work / "scores_kl.json"
    if not path.exists():  # the default recipe's scorer and calibration (8 x 128 validation tokens)
        batches = calibration_batches(tokenizer, num_samples=8, seq_len=128, batch_size=4, seed=0)
        SCORERS["kl"]().score(copy.deepcopy(teacher).to(torch.bfloat16), batches).save_json(path)
    return HeadScores.load_json(path)


def pruned_model(work: Path, teacher, tokenizer, v: Variant, fraction: float):
    """The teacher pruned at the variant's granularity/layout (cached on disk), and the removed share."""
    path = work / "pruned" / f"{v.granularity}-{v.layout}-{fraction}"
    if not (path / "config.json").exists():
        spec = ModelSpec.from_model(teacher)
        remove = select_heads(kl_scores(work, teacher, tokenizer), fraction, v.layout, v.granularity, spec)
        model = prune_heads(copy.deepcopy(teacher), remove)
        save_compact(model, None, path)
        atomic_write_json(path / "removed.json", {"remove": remove, "fraction": removed_fraction(remove, spec)})
    return load_compact(path, "bfloat16").requires_grad_(False), json.loads((path / "removed.json").read_text())["fraction"]


# ------------------------------------------------------------------------------ recovery


def make_trainable(model, v: Variant):
    if v.targets == "o_proj":
        train_only(model, [r"self_attn\.o_proj\.weight"])
        return model
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    return add_lora(model, LoraSettings(rank=v.lora_rank, alpha=2.0 * v.lora_rank, targets=targets,
                                        include_mlp=v.targets == "attn+mlp"))


def step_cpu_seconds(student, teacher, windows: torch.Tensor, v: Variant, batch: int) -> float:
    """CPU seconds of one training step of this variant (teacher forward + student forward/backward): the
    fastest of three trial steps; nothing is updated. (The second of two over-estimated: 27.6 s against
    11.8 s per real step for `recipe` on the loaded machine, which then used 47 of its 120 CPU-seconds.)"""
    params = [p for p in student.parameters() if p.requires_grad]
    spent = float("inf")
    for trial in range(3):  # widened as distill() runs it (models/widen.py)
        began = time.process_time()
        ids = windows[trial * batch : (trial + 1) * batch]
        with widened_linears(student, teacher):
            with torch.no_grad():
                target = teacher(input_ids=ids, use_cache=False).logits
            loss, _ = kd_loss(student(input_ids=ids, use_cache=False).logits, target, ids, v.alpha, v.temperature)
            loss.backward()
        spent = min(spent, time.process_time() - began)
    for p in params:
        p.grad = None
    return spent


def data_spec(v: Variant, teacher_tokens: int) -> str:
    """The variant's data with the teacher stream cut to ``teacher_tokens`` (a prefix of the shared cache)."""
    return v.data.replace(TEACHER_DATA, f"{TEACHER_DATA}:tokens={teacher_tokens}")


def recover(student, teacher, tokenizer, v: Variant, budget_min: float, work: Path, name: str,
            fixed_steps: int | None, args) -> tuple[object, dict]:
    batch, seq_len = args.batch, args.seq_len
    windows = training_windows(tokenizer, seq_len, data=data_spec(v, args.teacher_tokens), model=MODEL, loaded=teacher)
    record: dict = {"data": data_spec(v, args.teacher_tokens), "train_windows": int(windows.shape[0]),
                    "train_tokens_available": int(windows.numel())}
    began = time.process_time()  # the budget starts here: the layer-local stage counts in it
    if v.local:
        report = local_stage(student, teacher, windows, LocalStageConfig(method=v.local, windows=16))
        record["local_stage"] = report
        print(f"{name}: layer-local stage", {k: round(r["heldout_before"], 3) for k, r in report["layers"].items()}, "->",
              {k: round(r["heldout_after"], 3) for k, r in report["layers"].items()}, flush=True)
    if v.targets == "none":
        record["cpu_seconds"] = time.process_time() - began
        return student, record
    student = make_trainable(student, v)
    left = budget_min * 60 - (time.process_time() - began)
    per_step = None if fixed_steps else step_cpu_seconds(student, teacher, windows, v, batch)
    steps = fixed_steps or max(2, int(left / per_step))
    record |= {"trial_step_cpu_seconds": per_step, "planned_steps": steps}
    config = DistillConfig(steps=steps, batch_size=batch, seq_len=seq_len, lr=v.lr, warmup_steps=max(1, steps // 10),
                           alpha=v.alpha, temperature=v.temperature, seed=0, bf16=False, checkpoint_every=0,
                           max_cpu_minutes=None if fixed_steps else max(left, 1.0) / 60,
                           max_minutes=args.max_wall_minutes)
    result = distill(student, teacher, windows, config, out_dir=work / "checkpoints" / name)
    merged = merge_lora(student) if v.targets != "o_proj" else student
    record |= {"steps_done": result.steps_done, "distill_cpu_seconds": result.cpu_seconds,
               "stopped_early": result.stopped_early, "final_loss": result.losses[-1] if result.losses else None,
               "tokens_seen": result.steps_done * batch * seq_len}
    record["cpu_seconds"] = record.get("local_stage", {}).get("cpu_seconds", 0.0) + result.cpu_seconds
    return merged.requires_grad_(False).eval(), record


# ------------------------------------------------------------------------------ the sweep


def pruned_metrics(args, teacher, tokenizer, v: Variant, protos) -> Path:
    """The pruned model's (or, for a reference, the original's) metrics, measured once per --work."""
    key = "unpruned" if v.reference else f"{v.granularity}-{v.layout}"
    path = args.work / "pruned_metrics" / f"{key}.json"
    if not path.exists():
        model = teacher if v.reference else pruned_model(args.work, teacher, tokenizer, v, args.fraction)[0]
        atomic_write_json(path, measure(model, tokenizer, protos))
    return path


def baseline_metrics(args, teacher, tokenizer, protos) -> dict:
    path = args.work / "baseline.json"
    if not path.exists():
        atomic_write_json(path, measure(teacher, tokenizer, protos) | {"protocols": {k: asdict(p) for k, p in protos.items()}})
    return json.loads(path.read_text())


def run_variant(name: str, v: Variant, args, teacher, tokenizer, protos) -> dict:
    """Recover, save, measure one variant (baseline and pruned metrics are read from --work, or measured last,
    so several sweeps can start at once after --prepare has built the pruned models)."""
    key = f"{name}@{args.budget:g}"
    path = args.work / "variants" / f"{key}.json"
    if path.exists():
        print(f"{key}: read back from {path}")
        return json.loads(path.read_text())
    fixed = None
    if v.reference:
        if not args.reference_steps_of:
            raise LeanLMError(f"{name} is a reference: give --reference-steps-of NAME@BUDGET (its steps are reused)")
        fixed = json.loads((args.work / "variants" / f"{args.reference_steps_of}.json").read_text())["training"]["steps_done"]
        student, fraction = copy.deepcopy(teacher).requires_grad_(False), 0.0
    else:
        student, fraction = pruned_model(args.work, teacher, tokenizer, v, args.fraction)
    model, training = recover(student, teacher, tokenizer, v, args.budget, args.work, key, fixed, args)
    if args.save_models:
        save_compact(model, tokenizer, args.work / "models" / key)
    metrics = measure(model, tokenizer, protos)
    baseline = baseline_metrics(args, teacher, tokenizer, protos)
    pruned = json.loads(pruned_metrics(args, teacher, tokenizer, v, protos).read_text())
    record = {"name": name, "budget_cpu_minutes": args.budget, "variant": asdict(v), "heads_removed_fraction": fraction,
              "pruned": pruned, "recovered": metrics, "training": training, "ratios": ratios(metrics, baseline),
              "pruned_ratios": ratios(pruned, baseline), "command": " ".join(sys.argv)}
    atomic_write_json(path, record)
    print(f"{key}: {record['ratios']} steps {training.get('steps_done')} cpu {training['cpu_seconds']:.0f}s", flush=True)
    return record


def ratios(metrics: dict, baseline: dict) -> dict:
    return {text: metrics[text]["perplexity"] / baseline[text]["perplexity"] for text in metrics if text in baseline}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="cache: scores, pruned models, finished variants")
    parser.add_argument("--out", type=Path, required=True, help="JSON gathering every finished variant of --work")
    parser.add_argument("--variants", default="recipe", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--budget", type=float, default=3.5, help="CPU minutes of recovery per variant")
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the heads to remove")
    parser.add_argument("--texts", default="wikitext,botchan,pride", help="evaluation texts (comma list)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored per text")
    parser.add_argument("--teacher-tokens", type=int, default=12000,
                        help="teacher text: the first N tokens of the cached stream (every variant the same)")
    parser.add_argument("--max-wall-minutes", type=float, default=None,
                        help="also stop distillation after this wall time (a deadline on a shared machine; recorded)")
    parser.add_argument("--eval-window", type=int, default=512, help="non-overlapping window length")
    parser.add_argument("--batch", type=int, default=4, help="training windows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    parser.add_argument("--reference-steps-of", help="NAME@BUDGET whose steps a reference variant repeats")
    parser.add_argument("--save-models", action="store_true", help="save each recovered model under --work/models")
    parser.add_argument("--no-metrics", action="store_true", help="with --prepare: build the pruned models only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the budget is CPU time either way)")
    parser.add_argument("--prepare", action="store_true",
                        help="only build and measure the baseline and the variants' pruned models (run once before "
                             "several sweeps share --work in parallel)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        names = [n for n in args.variants.split(",") if n]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise LeanLMError(f"unknown variant '{unknown[0]}'")
        tokenizer = load_tokenizer(MODEL)
        teacher = load_model(MODEL, "bfloat16").requires_grad_(False)
        protos = protocols([t for t in args.texts.split(",") if t], args.eval_tokens, args.eval_window)
        for name in names:
            if args.prepare:  # the pruned models first (seconds), so parallel sweeps can start; then the metrics
                if not VARIANTS[name].reference:
                    pruned_model(args.work, teacher, tokenizer, VARIANTS[name], args.fraction)
                continue
            run_variant(name, VARIANTS[name], args, teacher, tokenizer, protos)
        if args.prepare and not args.no_metrics:
            baseline_metrics(args, teacher, tokenizer, protos)
            for name in names:
                pruned_metrics(args, teacher, tokenizer, VARIANTS[name], protos)
        baseline = baseline_metrics(args, teacher, tokenizer, protos)
    except LeanLMError as err:
        print(f"recovery_sweep: error: {err}", file=sys.stderr)
        return 2
    finished = {p.stem: json.loads(p.read_text()) for p in sorted((args.work / "variants").glob("*.json"))}
    atomic_write_json(args.out, {"baseline": baseline, "variants": finished, "command": " ".join(sys.argv),
                                 "versions": versions(), "git": git_info()})
    print(table(baseline, finished))
    return 0


def table(baseline: dict, finished: dict) -> str:
    texts = [t for t in baseline if t != "protocols"]
    lines = ["| variant | " + " | ".join(f"{t} ratio" for t in texts) + " | steps | CPU s |",
             "| --- |" + " ---: |" * (len(texts) + 2)]
    for key, r in finished.items():
        cells = " | ".join(f"{r['ratios'].get(t, float('nan')):.3f}" for t in texts)
        lines.append(f"| {key} | {cells} | {r['training'].get('steps_done', 0)} | {r['training']['cpu_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
