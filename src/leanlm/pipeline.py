"""Run a recipe end to end:
load -> baseline eval -> each transform in order, each followed by its eval -> recover (LoRA + KD)
-> merge -> eval -> export -> report.

The run directory is written as the run goes: each finished stage leaves `stages/<name>.json`; each
finished transform leaves `stages/t<i>-<name>/model` (only the latest is kept: it is all a resume
needs) and `stages/t<i>-<name>-report.json`; recovered models go under `stages/`; distillation
checkpoints every N steps; `results.json` is written last. An interrupted run is continued with
`--resume` (finished stages are read back, the latest transformed model is loaded, distillation
resumes from its checkpoint); a finished run is never overwritten, and a resume with a changed
recipe is refused. A transform whose ``needs`` names head scores or calibration gets them computed
on the model as it is when the transform starts (``leanlm.transforms.context``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from leanlm.analyze import HeadScores
from leanlm.data.sources import DataContext, DataMix
from leanlm.errors import LeanLMError
from leanlm.evaluate import EvalConfig, PerplexityProtocol, SpeedConfig, evaluate, perplexity
from leanlm.export import export_model, model_card, stock_layout
from leanlm.models import ModelSpec, load_model, load_tokenizer, parse_dtype, resolve_device
from leanlm.models.arch import arch_of
from leanlm.recipe import Recipe
from leanlm.recover import add_lora, distill, merge_lora, train_only
from leanlm.recover.local_stage import local_stage
from leanlm.report import atomic_write_json, atomic_write_text, git_info, versions
from leanlm.report.pipeline_report import data_words, describe_transform, write_pipeline_report
from leanlm.transforms import Transform, load_compact, save_compact
from leanlm.transforms.context import CalibrationSettings, transform_context

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

    def check_recipe(self, recipe: Recipe) -> None:
        """Write config.yaml; on resume, refuse a recipe that differs from the one the run started with."""
        path, text = self.path / "config.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        if path.exists() and yaml.safe_load(path.read_text()) != yaml.safe_load(text):
            raise LeanLMError(f"'{self.path}' was started with another recipe (see its config.yaml); "
                              "resume it with that recipe, or pick a new --out")
        atomic_write_text(path, text)

    def done(self, name: str) -> bool:
        return (self.path / "stages" / f"{name}.json").exists()

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
    for name in ev.texts:  # more evaluation texts (files or built-in novels), same protocol
        scored = perplexity(model, tokenizer, PerplexityProtocol("test", ev.method, ev.window, ev.stride, ev.max_tokens, name))
        results.setdefault("texts", {})[name] = {"perplexity": scored.perplexity, "protocol": scored.protocol}
    del model
    return results


# ---------------------------------------------------------------------------------- transforms


def transform_keys(recipe: Recipe) -> list[str]:
    """Stage names of the recipe's transforms, in order: t1-prune_layers, t2-prune_heads, ..."""
    return [f"t{i}-{t.name}" for i, t in enumerate(recipe.transforms, 1)]


def apply_transform(transform: Transform, model, tokenizer, calibration: CalibrationSettings,
                    score_dtype: str = "bfloat16", data=None, source: str | None = None,
                    teacher=None) -> tuple[dict, HeadScores | None]:
    """Build the context the transform needs (on the model as it is now), apply it in place; JSON record.

    ``data`` is the calibration data setting; ``source`` / ``teacher`` the original model (for teacher text).
    """
    started = time.perf_counter()
    mix = DataMix.parse(data)
    context = transform_context(transform, model, tokenizer, calibration, score_dtype, mix, source, teacher)
    report = transform.apply(model, **context)
    record = {"settings": transform.to_dict(), **report.to_dict(), "seconds": time.perf_counter() - started,
              "spec": ModelSpec.from_model(model).to_dict()}
    if mix.used:  # calibration text was read: record what
        record["data"] = mix.describe()
    scores = context.get("scores")
    if scores is not None:
        record["scores"] = scores.to_dict()
    return record, scores


def transform_stages(run: RunDir, teacher, tokenizer, recipe: Recipe) -> tuple[object, list[dict]]:
    """Apply every transform in order, each saved and measured; returns (final model, per-transform records).

    Resuming starts from the latest saved transformed model; earlier transforms are read back.
    """
    keys, stages = transform_keys(recipe), run.path / "stages"
    saved = [i for i, key in enumerate(keys) if (stages / key / "model").is_dir()]
    last = saved[-1] if saved else -1
    if last >= 0:  # frozen like the teacher it came from (recovery chooses what trains)
        model = load_compact(stages / keys[last] / "model").to(teacher.device).requires_grad_(False)
    else:
        model = copy.deepcopy(teacher)
    steps = []
    for i, (key, transform) in enumerate(zip(keys, recipe.transforms)):
        record_path = stages / f"{key}-report.json"
        if i > last:
            log.info("transform %d of %d: %s", i + 1, len(keys), transform.to_dict())
            record, _ = apply_transform(transform, model, tokenizer, recipe.calibration, recipe.dtype,
                                        data=recipe.data, source=recipe.model, teacher=teacher)
            save_compact(model, None, stages / f".{key}-model.tmp")
            (stages / key).mkdir(exist_ok=True)
            (stages / f".{key}-model.tmp").rename(stages / key / "model")
            atomic_write_json(record_path, record)
            if i > 0:  # only the latest model is needed to resume
                shutil.rmtree(stages / keys[i - 1], ignore_errors=True)
        elif not record_path.exists():
            raise LeanLMError(f"'{run.path}' is inconsistent: {key} has a model but no {record_path.name}; start a new run")
        record = json.loads(record_path.read_text())
        if i < last and not run.done(key):
            raise LeanLMError(f"'{run.path}' is inconsistent: {key} was never measured; start a new run")
        metrics = run.stage(key, lambda: measure(model, tokenizer, recipe))
        steps.append({"stage": key, "name": transform.name, "record": record, "metrics": metrics})
    return model, steps


def transform_summary(steps: list[dict], baseline: dict) -> dict:
    """Top-level numbers of the transforms (heads_removed_fraction: of the heads prune_heads saw)."""
    summary = {}
    heads = [s["record"]["removed"] for s in steps if s["name"] == "prune_heads"]
    if heads:
        summary["heads_removed_fraction"] = heads[-1]["fraction_achieved"]
    if steps:
        summary["transforms_params_removed"] = baseline["params"] - steps[-1]["metrics"]["params"]
    return summary


# ---------------------------------------------------------------------------------- recovery


def monitor_fn(tokenizer, recipe: Recipe):
    """Perplexity on the first test tokens during training: a curve for the report, never used to select."""
    protocol = PerplexityProtocol("test", "nonoverlap", 512, 512, recipe.recover.eval_tokens)

    def monitor(model) -> float:
        return perplexity(model, tokenizer, protocol).perplexity

    return monitor


def recover(variant: str, start, teacher, tokenizer, recipe: Recipe, work: Path, **overrides):
    """Train a copy of `start` with one recovery variant; returns (merged model, DistillResult dict).

    Student and teacher weights are in `recover.dtype` (bfloat16: ~3x faster steps on a CPU
    with AVX-512 BF16; peft keeps the LoRA adapters in float32 on a bf16 base). `overrides` replace
    fields of `recover.distill` (a DistillConfig) for this run only.
    """
    device, dtype = start.device, parse_dtype(recipe.recover.dtype)
    student = copy.deepcopy(start).to(dtype)
    teacher = teacher if teacher.dtype == dtype else copy.deepcopy(teacher).to(dtype)
    config = dataclasses.replace(recipe.recover.distill, **overrides)
    data = DataMix.parse(recipe.recover.data if recipe.recover.data is not None else recipe.data)
    windows = data.training(DataContext(tokenizer, recipe.model, teacher), config.seq_len)  # (n, seq_len)
    local = None
    if variant != "reference_lora_ce" and recipe.recover.local.method != "none":
        local = local_stage_record(student, teacher, windows, recipe)
        if config.max_cpu_minutes is not None:  # the stage's CPU time is part of the recovery budget
            left = max(config.max_cpu_minutes - local["cpu_seconds"] / 60, 0.01)
            config = dataclasses.replace(config, max_cpu_minutes=left)
    if variant in ("lora_kd", "reference_lora_ce"):
        student = add_lora(student, recipe.recover.lora)
    elif variant == "kd_oproj":
        family = arch_of(student).family  # the attention output projection's name in this family
        train_only(student, [rf"{family.attention}\.{family.projections[3]}\.weight"])
    monitor = monitor_fn(tokenizer, recipe) if config.eval_every else None
    result = distill(student, teacher, windows, config, out_dir=work / "checkpoints", resume=True, eval_fn=monitor)
    merged = merge_lora(student) if variant != "kd_oproj" else student
    for param in merged.parameters():
        param.requires_grad_(False)
    record = result.to_dict() | {"data": data.describe()} | ({"local_stage": local} if local else {})
    return merged.to(device).eval(), record  # accelerate may have moved it: back to the run's device


def local_stage_record(student, teacher, windows, recipe: Recipe) -> dict:
    """The layer-local stage, in place on ``student``; a resumed run redoes it (seconds) before its checkpoint."""
    report = local_stage(student, teacher, windows, recipe.recover.local)
    log.info("layer-local stage (%s): held-out error %s -> %s", recipe.recover.local.method,
             {k: round(r["heldout_before"], 3) for k, r in report["layers"].items()},
             {k: round(r["heldout_after"], 3) for k, r in report["layers"].items()})
    return report


def recovered_stage(run: RunDir, variant: str, start, teacher, tokenizer, recipe: Recipe, **overrides):
    """Recover (or read back a finished recovery) and measure; returns (model, metrics, training record)."""
    work = run.path / "stages" / variant
    model_dir = work / "model"
    record_path = run.path / "stages" / f"{variant}-training.json"
    if model_dir.exists() and record_path.exists():
        model, training = load_compact(model_dir).to(start.device), json.loads(record_path.read_text())
    else:
        model, training = recover(variant, start, teacher, tokenizer, recipe, work, **overrides)
        save_compact(model, None, model_dir)
        atomic_write_json(record_path, training)
    metrics = run.stage(variant, lambda: measure(model, tokenizer, recipe))
    return model, metrics, training


# ---------------------------------------------------------------------------------- the run


def run_recipe(recipe: Recipe, out: Path, resume: bool = False, with_reference: bool = False) -> dict:
    """Run every step of `recipe` into `out`; returns the results dict also written to results.json."""
    started = time.perf_counter()
    device = resolve_device(recipe.device)  # a cuda recipe on a machine without CUDA fails before anything is written
    run = RunDir(out, resume)
    run.check_recipe(recipe)
    teacher, tokenizer = load_model(recipe.model, "float32", device), load_tokenizer(recipe.model)
    for param in teacher.parameters():
        param.requires_grad_(False)
    results = {"name": recipe.name, "model": recipe.model, "device": str(device), "recipe": recipe.to_dict()}
    results["baseline"] = run.stage("baseline", lambda: measure(teacher, tokenizer, recipe))

    pruned, steps = transform_stages(run, teacher, tokenizer, recipe)
    results["transforms"] = steps
    results["pruned"] = steps[-1]["metrics"] if steps else None
    results |= transform_summary(steps, results["baseline"])

    models, training = {}, {}
    for variant in recipe.recover.variants if recipe.recover else []:
        models[variant], results[variant], training[variant] = recovered_stage(run, variant, pruned, teacher, tokenizer, recipe)
    main = "lora_kd" if "lora_kd" in models else next(iter(models), None)
    results["recovered"] = results[main] if main else None
    if with_reference and main:
        # Same LoRA budget in steps, CE only, on the unpruned model: no time caps, so a reference slowed by
        # another job (or with more CPU time per step) still takes every step the recovered model took.
        steps_done = training[main]["steps_done"]
        _, results["reference"], training["reference_lora_ce"] = recovered_stage(
            run, "reference_lora_ce", teacher, teacher, tokenizer, recipe, alpha=0.0, steps=steps_done, max_minutes=None,
            max_cpu_minutes=None)
    results["training"] = {v: _training_summary(t) for v, t in training.items()}
    results["params"] = {k: results[k]["params"] for k in ("baseline", "pruned", "recovered") if results.get(k)}
    final = models.get(main, pruned)
    if recipe.export.enabled:
        results["export"] = _export(final, tokenizer, run.path / "model", recipe, results)
    results |= {"seconds_total": time.perf_counter() - started, "versions": versions(), "git": git_info()}
    write_pipeline_report(run.path, results, training)
    atomic_write_json(run.path / "results.json", results)  # last: its presence marks a finished run
    return results


def _training_summary(record: dict) -> dict:
    return {
        "steps": record["steps_done"],
        "data": record.get("data", {}).get("spec"),
        "train_minutes": record["seconds"] / 60,
        "stopped_early": record["stopped_early"],
        "tokens_per_step": record["tokens_per_step"],
        "final_loss": record["losses"][-1]["total"] if record["losses"] else None,
        "bf16_autocast": record["bf16"],
    }


def _export(model, tokenizer, path: Path, recipe: Recipe, results: dict) -> dict:
    base, rec = results["baseline"], results.get("recovered") or results.get("pruned") or results["baseline"]
    steps = [f"Loaded `{recipe.model}`; baseline WikiText-2 test perplexity {base['perplexity']:.3f}."]
    for step in results["transforms"]:
        steps.append(f"{describe_transform(step['record'])}; perplexity {step['metrics']['perplexity']:.3f} "
                     "without recovery.")
    if results.get("recovered"):
        t = results["training"].get("lora_kd") or next(iter(results["training"].values()))
        steps.append(f"Recovered with LoRA (rank {recipe.recover.lora.rank}) + knowledge distillation from the original "
                     f"on {data_words(t.get('data'))}: {t['steps']} steps, {t['train_minutes']:.1f} min; adapters merged.")
    metrics = [
        ("perplexity (WikiText-2 test)", f"{rec['perplexity']:.3f} (original {base['perplexity']:.3f})"),
        ("protocol", f"{rec['protocol']['method']}, window {rec['protocol']['window']}, "
                     f"{rec['protocol']['tokens_scored']:,} tokens, {rec['protocol']['dtype']}"),
        ("parameters", f"{rec['params']:,} (original {base['params']:,})"),
        ("KV bytes / token", f"{rec['kv_bytes_per_token']:,.0f} (original {base['kv_bytes_per_token']:,.0f})"),
    ]
    if "ood_perplexity" in rec:
        metrics.append(("perplexity, out of domain (Botchan)", f"{rec['ood_perplexity']:.3f} (original {base['ood_perplexity']:.3f})"))
    card = model_card(f"{recipe.name}: {recipe.model}, compressed and recovered by leanlm", steps, metrics,
                      ModelSpec.from_model(model), stock=stock_layout(model))
    exported = export_model(model, tokenizer, path, card, padded=recipe.export.padded)
    return exported.to_dict()
