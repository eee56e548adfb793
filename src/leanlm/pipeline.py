"""Run a recipe end to end:
load -> baseline eval -> score heads -> prune -> eval -> recover (LoRA + KD) -> merge -> eval -> export -> report.

The run directory is written as the run goes: each finished stage leaves `stages/<name>.json`
(and recovered models under `stages/`), distillation checkpoints every N steps, and
`results.json` is written last. An interrupted run is continued with `--resume` (finished stages
are read back, distillation resumes from its checkpoint); a finished run is never overwritten.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from leanlm.analyze import HeadScores, score_heads
from leanlm.errors import LeanLMError
from leanlm.evaluate import EvalConfig, PerplexityProtocol, SpeedConfig, evaluate, perplexity
from leanlm.export import export_model, model_card, stock_layout
from leanlm.models import ModelSpec, load_model, load_tokenizer, parse_dtype
from leanlm.recipe import Recipe
from leanlm.recover import DistillConfig, LoraSettings, add_lora, distill, merge_lora, train_only, training_windows
from leanlm.report import atomic_write_json, atomic_write_text, git_info, versions
from leanlm.transforms import load_compact, prune_heads, removed_fraction, save_compact, select_heads

log = logging.getLogger("leanlm")

VARIANT_TITLES = {
    "lora_kd": "LoRA + KD",
    "kd_oproj": "KD, no LoRA (only attention o_proj trains)",
    "reference_lora_ce": "reference: unpruned model, LoRA + CE, same steps and data",
}


class RunDir:
    """A run directory whose finished stages are remembered, so an interrupted run can continue."""

    def __init__(self, path: Path, resume: bool):
        self.path = Path(path)
        if (self.path / "results.json").exists():
            raise LeanLMError(f"'{self.path}' holds a finished run; results are never overwritten, pick a new --out")
        if self.path.exists() and any(self.path.iterdir()) and not resume:
            raise LeanLMError(f"'{self.path}' holds an unfinished run: pass --resume to continue it, or pick a new --out")
        (self.path / "stages").mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, compute) -> dict:
        """The stage's saved result, or compute it and save it."""
        path = self.path / "stages" / f"{name}.json"
        if path.exists():
            log.info("stage %s: read back from %s", name, path)
            return json.loads(path.read_text())
        value = compute()
        atomic_write_json(path, value)
        return value


def eval_copy(model, dtype: str):
    """A copy in the evaluation dtype (training keeps float32 master weights)."""
    return copy.deepcopy(model).to(parse_dtype(dtype)).eval()


def measure(model, tokenizer, recipe: Recipe) -> dict:
    """The foundation's metrics (same protocol every time), plus out-of-domain perplexity."""
    ev = recipe.eval
    protocol = PerplexityProtocol("test", ev.method, ev.window, ev.stride, ev.max_tokens)
    config = EvalConfig(protocol, SpeedConfig(repeats=ev.speed_repeats), measure_speed=ev.speed)
    model = eval_copy(model, recipe.dtype)
    results = evaluate(model, tokenizer, config)
    results.pop("_series", None)
    results.pop("versions", None)
    results.pop("git", None)
    if ev.ood:
        ood = perplexity(model, tokenizer, PerplexityProtocol("botchan", ev.method, ev.window, ev.stride, ev.max_tokens))
        results["ood_perplexity"], results["ood_protocol"] = ood.perplexity, ood.protocol
    del model
    return results


def monitor_fn(tokenizer, recipe: Recipe):
    """Perplexity on the first test tokens during training: a curve for the report, never used to select."""
    protocol = PerplexityProtocol("test", "nonoverlap", 512, 512, recipe.recover.distill.eval_tokens)

    def monitor(model) -> float:
        return perplexity(model, tokenizer, protocol).perplexity

    return monitor


def distill_config(recipe: Recipe, **overrides) -> DistillConfig:
    d = recipe.recover.distill
    fields = dict(steps=d.steps, max_minutes=d.max_minutes, batch_size=d.batch_size, seq_len=d.seq_len,
                  grad_accum=d.grad_accum, lr=d.lr, warmup_steps=d.warmup_steps, alpha=d.alpha, temperature=d.temperature,
                  top_k_teacher=d.top_k_teacher, checkpoint_every=d.checkpoint_every, eval_every=d.eval_every)
    return DistillConfig(**(fields | overrides))


def recover(variant: str, start, teacher, tokenizer, recipe: Recipe, work: Path, **overrides):
    """Train a copy of `start` with one recovery variant; returns (merged model, DistillResult dict).

    Student and teacher weights are in `recover.distill.dtype` (bfloat16: ~3x faster steps on a CPU
    with AVX-512 BF16; peft keeps the LoRA adapters in float32 on a bf16 base).
    """
    dtype = parse_dtype(recipe.recover.distill.dtype)
    student = copy.deepcopy(start).to(dtype)
    teacher = teacher if teacher.dtype == dtype else copy.deepcopy(teacher).to(dtype)
    if variant in ("lora_kd", "reference_lora_ce"):
        lora = recipe.recover.lora
        student = add_lora(student, LoraSettings(rank=lora.rank, alpha=lora.alpha, include_mlp=lora.include_mlp))
    elif variant == "kd_oproj":
        train_only(student, [r"self_attn\.o_proj\.weight"])
    windows = training_windows(tokenizer, recipe.recover.distill.seq_len)
    config = distill_config(recipe, **overrides)
    monitor = monitor_fn(tokenizer, recipe) if config.eval_every else None
    result = distill(student, teacher, windows, config, out_dir=work / "checkpoints", resume=True, eval_fn=monitor)
    merged = merge_lora(student) if variant != "kd_oproj" else student
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.eval(), result.to_dict()


def recovered_stage(run: RunDir, variant: str, start, teacher, tokenizer, recipe: Recipe, **overrides):
    """Recover (or read back a finished recovery) and measure; returns (model, metrics, training record)."""
    work = run.path / "stages" / variant
    model_dir = work / "model"
    record_path = run.path / "stages" / f"{variant}-training.json"
    if model_dir.exists() and record_path.exists():
        model, training = load_compact(model_dir), json.loads(record_path.read_text())
    else:
        model, training = recover(variant, start, teacher, tokenizer, recipe, work, **overrides)
        save_compact(model, None, model_dir)
        atomic_write_json(record_path, training)
    metrics = run.stage(variant, lambda: measure(model, tokenizer, recipe))
    return model, metrics, training


def run_recipe(recipe: Recipe, out: Path, resume: bool = False, with_reference: bool = False) -> dict:
    """Run every step of `recipe` into `out`; returns the results dict also written to results.json."""
    started = time.perf_counter()
    run = RunDir(out, resume)
    atomic_write_text(run.path / "config.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    teacher, tokenizer = load_model(recipe.model, "float32"), load_tokenizer(recipe.model)
    for param in teacher.parameters():
        param.requires_grad_(False)
    spec = ModelSpec.from_model(teacher)
    results = {"name": recipe.name, "model": recipe.model, "recipe": recipe.to_dict()}
    results["baseline"] = run.stage("baseline", lambda: measure(teacher, tokenizer, recipe))

    scores = HeadScores(**run.stage("scores", lambda: _score(teacher, tokenizer, recipe).to_dict()))
    p = recipe.prune
    remove = select_heads(scores, p.fraction, p.layout, p.granularity, spec)
    pruned = prune_heads(copy.deepcopy(teacher), remove)
    results |= {"heads_removed": {str(k): v for k, v in sorted(remove.items())},
                "heads_removed_fraction": removed_fraction(remove, spec), "scores_seconds": scores.seconds}
    results["pruned"] = run.stage("pruned", lambda: measure(pruned, tokenizer, recipe))

    models, training = {}, {}
    for variant in recipe.recover.variants if recipe.recover else []:
        models[variant], results[variant], training[variant] = recovered_stage(run, variant, pruned, teacher, tokenizer, recipe)
    if recipe.recover and "lora_kd" in models:
        results["recovered"], main = results["lora_kd"], "lora_kd"
    else:
        main = next(iter(models), None)
        results["recovered"] = results[main] if main else None
    if with_reference and main:
        steps = training[main]["steps_done"]  # same LoRA budget in steps, CE only, on the unpruned model
        _, results["reference"], training["reference_lora_ce"] = recovered_stage(
            run, "reference_lora_ce", teacher, teacher, tokenizer, recipe, alpha=0.0, steps=steps, max_minutes=None)
    results["training"] = {v: _training_summary(t) for v, t in training.items()}
    results["params"] = {k: results[k]["params"] for k in ("baseline", "pruned", "recovered") if results.get(k)}
    final = models.get(main, pruned)
    if recipe.export.enabled:
        results["export"] = _export(final, tokenizer, run.path / "model", recipe, results)
    results |= {"seconds_total": time.perf_counter() - started, "versions": versions(), "git": git_info()}
    from leanlm.report.pipeline_report import write_pipeline_report

    write_pipeline_report(run.path, results, training, scores)
    atomic_write_json(run.path / "results.json", results)  # last: its presence marks a finished run
    return results


def _score(teacher, tokenizer, recipe: Recipe) -> HeadScores:
    s = recipe.score
    scored = score_heads(eval_copy(teacher, recipe.dtype), tokenizer, [s.scorer], num_samples=s.calib_samples,
                         seq_len=s.calib_len, seed=s.seed)
    return scored[s.scorer]


def _training_summary(record: dict) -> dict:
    return {
        "steps": record["steps_done"],
        "train_minutes": record["seconds"] / 60,
        "stopped_early": record["stopped_early"],
        "tokens_per_step": record["tokens_per_step"],
        "final_loss": record["losses"][-1]["total"] if record["losses"] else None,
        "bf16_autocast": record["bf16"],
    }


def _export(model, tokenizer, path: Path, recipe: Recipe, results: dict) -> dict:
    base, rec = results["baseline"], results.get("recovered") or results["pruned"]
    steps = [
        f"Loaded `{recipe.model}`; baseline WikiText-2 test perplexity {base['perplexity']:.3f}.",
        f"Scored attention heads with `{recipe.score.scorer}` on WikiText-2 validation.",
        f"Removed {results['heads_removed_fraction']:.1%} of the query heads ({recipe.prune.layout} layout, "
        f"{recipe.prune.granularity} granularity); perplexity {results['pruned']['perplexity']:.3f} without recovery.",
    ]
    if results.get("recovered"):
        t = results["training"].get("lora_kd") or next(iter(results["training"].values()))
        steps.append(f"Recovered with LoRA (rank {recipe.recover.lora.rank}) + knowledge distillation from the original "
                     f"on WikiText-2 validation: {t['steps']} steps, {t['train_minutes']:.1f} min; adapters merged.")
    metrics = [
        ("perplexity (WikiText-2 test)", f"{rec['perplexity']:.3f} (original {base['perplexity']:.3f})"),
        ("protocol", f"{rec['protocol']['method']}, window {rec['protocol']['window']}, "
                     f"{rec['protocol']['tokens_scored']:,} tokens, {rec['protocol']['dtype']}"),
        ("parameters", f"{rec['params']:,} (original {base['params']:,})"),
        ("KV bytes / token", f"{rec['kv_bytes_per_token']:,.0f} (original {base['kv_bytes_per_token']:,.0f})"),
    ]
    if "ood_perplexity" in rec:
        metrics.append(("perplexity, out of domain (Botchan)", f"{rec['ood_perplexity']:.3f} (original {base['ood_perplexity']:.3f})"))
    card = model_card(f"{recipe.name}: {recipe.model}, pruned and recovered by leanlm", steps, metrics,
                      ModelSpec.from_model(model), stock=stock_layout(model))
    exported = export_model(model, tokenizer, path, card, padded=recipe.export.padded)
    return exported.to_dict()
