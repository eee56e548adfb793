"""What each CLI sub-command does, given its parsed arguments (kept apart from argument parsing).

The decoding commands (generate, eval --kv-cache) live in ``commands_decode``; new sub-commands go
in their own module (e.g. ``leanlm.serve.command``) and are registered in ``cli.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from argparse import Namespace
from pathlib import Path

from leanlm.cli_support import check_context as _check_context
from leanlm.cli_support import command_line as _command_line
from leanlm.cli_support import out_dir as _out_dir
from leanlm.commands_decode import policy_from_args, run_eval_kv_cache, run_generate  # noqa: F401 (cli.py's handlers)
from leanlm.errors import LeanLMError

log = logging.getLogger("leanlm")


def run_eval(args: Namespace) -> int:
    from leanlm.data.wikitext import split_source, wikitext_lines
    from leanlm.evaluate import EvalConfig, PerplexityProtocol, SpeedConfig, evaluate, write_eval_run
    from leanlm.models import load_model, load_tokenizer
    from leanlm.report.markdown import metrics_rows, table

    if args.kv_cache is not None:
        return run_eval_kv_cache(args)
    window = args.window or (1024 if args.protocol == "sliding" else 2048)
    protocol = PerplexityProtocol(args.split, args.protocol, window, args.stride or max(1, window // 2), args.max_tokens,
                                  args.text)
    protocol.validate()
    speed = SpeedConfig(tuple(args.prefill_lengths), tuple(args.decode_batches), decode_tokens=args.decode_tokens,
                        repeats=args.speed_repeats)
    speed.validate()
    out = _out_dir(args, "eval")
    if protocol.text_name is None:
        wikitext_lines(protocol.split)  # fail on missing data before loading the model
    _check_context(args.model, window, "--window")
    log.info("loading %s (%s)", args.model, args.dtype)
    model, tokenizer = load_model(args.model, args.dtype, args.device), load_tokenizer(args.model)
    config = EvalConfig(protocol, speed, measure_speed=not args.no_speed)
    results = evaluate(model, tokenizer, config)
    results["protocol"]["data"] = results["protocol"].get("text") or split_source(protocol.split)
    header = {"model": args.model, "command": _command_line(), "config": dataclasses.asdict(config)}
    write_eval_run(results, out, header)
    print(table(metrics_rows(results)))
    print(f"\nwrote {out}/results.json and {out}/report.md")
    return 0


def run_analyze(args: Namespace) -> int:
    from leanlm.analyze import SCORERS, score_heads
    from leanlm.models import load_model, load_tokenizer
    from leanlm.report import atomic_write_json, atomic_write_text, git_info, staged_output, versions
    from leanlm.report.head_plots import plot_group_heatmap, plot_head_heatmap

    names = [name.strip() for name in args.scorers.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCORERS]
    if unknown or not names:
        raise LeanLMError(f"unknown scorer '{','.join(unknown)}': choose from {', '.join(SCORERS)}")
    out = _out_dir(args, "analyze")
    model, tokenizer = load_model(args.model, args.dtype, args.device), load_tokenizer(args.model)
    scores = score_heads(model, tokenizer, names, num_samples=args.calib_samples, seq_len=args.calib_len, seed=args.seed,
                         data=args.data, source=args.model)
    with staged_output(out) as stage:
        (stage / "plots").mkdir()
        lines = [f"# leanlm analyze: {args.model}", ""]
        for name, result in scores.items():
            result.save_json(stage / f"scores_{name}.json")
            plot_head_heatmap(result, stage / "plots" / f"heads_{name}.png")
            plot_group_heatmap(result, stage / "plots" / f"groups_{name}.png")
            least = ", ".join(f"L{layer}H{head}" for layer, head in result.ranking()[:10])
            lines += [f"## {name} ({result.seconds:.0f} s)", "", f"Least important heads: {least}", "",
                      f"![heads](plots/heads_{name}.png) ![groups](plots/groups_{name}.png)", ""]
        summary = {"model": args.model, "command": _command_line(), "scorers": names,
                   "calibration": _calibration(scores),
                   "seconds": {n: s.seconds for n, s in scores.items()}, "versions": versions(), "git": git_info()}
        atomic_write_json(stage / "results.json", summary)
        atomic_write_text(stage / "report.md", "\n".join(lines))
    print(f"wrote {out}: " + ", ".join(f"scores_{n}.json" for n in names) + ", report.md, plots/")
    return 0


def _calibration(scores: dict) -> dict:
    """The calibration text the scorers read; magnitude reads only the weights, and says so."""
    used = [s.calibration for name, s in scores.items() if s.calibration.get("num_samples")]
    if used:
        return used[0]
    return {"num_samples": 0, "note": "no calibration text: " + ", ".join(scores) + " read the weights only"}


def run_kv_budget(args: Namespace) -> int:
    from leanlm.analyze.kv_budget import format_kv_table, kv_budget
    from leanlm.models import ModelSpec, load_config

    spec = ModelSpec.from_config(load_config(args.model))
    layers = args.layers or spec.num_layers
    heads = args.heads or spec.num_heads
    kv_heads = args.kv_heads or (spec.num_kv_heads if not args.heads else heads)
    if heads % kv_heads:
        raise LeanLMError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    spec = dataclasses.replace(
        spec, num_layers=layers, head_dim=args.head_dim or spec.head_dim, heads_per_layer=(heads,) * layers,
        kv_heads_per_layer=(kv_heads,) * layers, intermediate_per_layer=spec.intermediate_per_layer[:1] * layers,
        window_per_layer=spec.window_per_layer if layers == spec.num_layers else (),  # sliding windows (Gemma 3)
    )
    rows = kv_budget(spec, seq_len=args.seq_len, batch=args.batch, dtype_bytes=args.dtype_bytes,
                     latent_dim=args.latent_dim)
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
    else:
        print(f"{args.model if not (args.layers or args.heads or args.kv_heads or args.head_dim) else 'custom'}: "
              f"{layers} layers, {heads} query heads, {kv_heads} KV heads, head_dim {spec.head_dim}, "
              f"{args.seq_len} tokens x batch {args.batch}, {args.dtype_bytes} bytes/value\n")
        print(format_kv_table(rows))
    return 0


def run_run(args: Namespace) -> int:
    from leanlm.outputs import default_out
    from leanlm.pipeline import run_recipe
    from leanlm.recipe import load_recipe
    from leanlm.report.pipeline_report import comparison_table

    recipe = load_recipe(args.recipe)
    if args.device is not None:  # the command line wins over the recipe's `device:`
        recipe = dataclasses.replace(recipe, device=args.device)
    if args.resume and not args.out:
        raise LeanLMError("--resume needs --out: the run directory to continue")
    out = args.out or default_out(recipe.name, recipe.model)
    results = run_recipe(recipe, out, resume=args.resume, with_reference=args.with_reference)
    print(comparison_table(results))
    print(f"\nwrote {out}/results.json, report.md, plots/ and model/")
    return 0


PRUNE_OPTIONS = {"fraction": "fraction", "layout": "layout", "granularity": "granularity", "scorer": "scorer",
                 "num_layers": "num_layers", "layers": "layers"}  # argparse dest -> transform setting


def prune_transform(args: Namespace):
    """The transform `leanlm prune --what W` names, with the options the user gave (the rest: its defaults)."""
    from leanlm.transforms import TRANSFORMS, Transform

    whats = [name.removeprefix("prune_") for name in TRANSFORMS if name.startswith("prune_")]
    if args.what not in whats:
        raise LeanLMError(f"--what must be one of {', '.join(whats)}, got '{args.what}'")
    cls = TRANSFORMS[f"prune_{args.what}"]
    settings = {field: getattr(args, dest) for dest, field in PRUNE_OPTIONS.items() if getattr(args, dest) is not None}
    known = {f.name for f in dataclasses.fields(cls)}
    foreign = [f"--{dest.replace('_', '-')}" for dest, field in PRUNE_OPTIONS.items() if field in settings and field not in known]
    if foreign:
        raise LeanLMError(f"{', '.join(foreign)} does not apply to --what {args.what} "
                          f"(its options: {', '.join('--' + k.replace('_', '-') for k in sorted(known))})")
    return Transform.from_dict({"name": cls.name, **settings})


def run_prune(args: Namespace) -> int:
    from leanlm.cli_support import announce_prune_plan, size_line, source_weight_bytes, weight_bytes
    from leanlm.export import export_model, model_card, size_metrics, stock_layout
    from leanlm.models import ModelSpec, load_config, load_model, load_tokenizer
    from leanlm.models.loading import DTYPES, source_dtype
    from leanlm.pipeline import apply_transform
    from leanlm.report import atomic_write_json, staged_output
    from leanlm.report.pipeline_report import describe_transform
    from leanlm.transforms.context import CalibrationSettings

    transform = prune_transform(args)  # bad options fail before the model loads
    calibration = CalibrationSettings(samples=args.calib_samples, seq_len=args.calib_len)
    out = _out_dir(args, "prune")
    if args.what == "heads":  # say what the fraction becomes before the work
        announce_prune_plan(load_config(args.model), transform.fraction, transform.layout, transform.granularity)
    dtype = args.dtype or source_dtype(args.model)
    model, tokenizer = load_model(args.model, "float32", args.device), load_tokenizer(args.model)
    record, scores = apply_transform(transform, model, tokenizer, calibration, "float32", data=args.data, source=args.model)
    summary = describe_transform(record)
    model.to(DTYPES[dtype])  # saved in the source's dtype unless --dtype says otherwise
    with staged_output(out) as stage:
        if scores is not None:
            scores.save_json(stage / f"scores_{scores.scorer}.json")
        steps = [f"{summary} of `{args.model}`; no recovery."]
        removed = record["removed"]
        measured = ([("query heads removed", f"{removed['fraction_achieved']:.2%}")] if "fraction_achieved" in removed else [])
        card = model_card(f"{args.model}, {transform.name} by leanlm", steps, [*measured, *size_metrics(model)],
                          ModelSpec.from_model(model), stock=stock_layout(model))
        exported = export_model(model, tokenizer, stage / "model", card)
        sizes = {"saved": weight_bytes(stage / "model"), "source": source_weight_bytes(args.model), "dtype": dtype}
        export = {k: v.replace(str(stage), str(out)) if isinstance(v, str) else v for k, v in exported.to_dict().items()}
        atomic_write_json(stage / "prune.json", {"model": args.model, "command": _command_line(),
                                                 "transform": record, "weight_bytes": sizes, "export": export})
    print(f"{summary}; parameters {record['params_before']:,} -> {record['params_after']:,}; model in {out}/model"
          + (" (+ model-padded)" if exported.padded_path else ""))
    print(size_line("pruned model", sizes["saved"], sizes["source"], dtype))
    return 0


def run_distill(args: Namespace) -> int:
    from leanlm.cli_support import check_distill_resume, size_line, source_weight_bytes, weight_bytes
    from leanlm.data.sources import DataContext, DataMix
    from leanlm.models import load_model, load_tokenizer
    from leanlm.models.loading import DTYPES, source_dtype
    from leanlm.recover import DistillConfig, LoraSettings, add_lora, distill, merge_lora, plot_loss_curve
    from leanlm.recover.checkpoint import stop_on_signals
    from leanlm.report import atomic_write_json, ordinary_modes
    from leanlm.transforms import save_compact

    out = Path(args.out)
    if args.resume:
        check_distill_resume(out, args)  # the same settings, in CLI words; a finished run says how to go on
    config = DistillConfig(steps=args.steps or 200, max_minutes=args.max_minutes, alpha=args.alpha,
                           temperature=args.temperature, top_k_teacher=args.top_k_teacher,
                           checkpoint_every=args.checkpoint_every, seq_len=args.seq_len, batch_size=args.batch_size)
    config.check()
    settings = LoraSettings(rank=args.lora_rank, include_mlp=args.lora_mlp)
    dtype = args.dtype or source_dtype(args.student)
    student = add_lora(load_model(args.student, "float32", args.device), settings)
    teacher, tokenizer = load_model(args.teacher, "float32", args.device), load_tokenizer(args.student)
    data = DataMix.parse(args.data)  # WikiText-2 validation unless --data says otherwise
    windows = data.training(DataContext(tokenizer, args.teacher, teacher, args.device), config.seq_len)  # (n, seq_len)
    with stop_on_signals():  # Ctrl-C / SIGTERM: checkpoint after the current step, then exit 130
        result = distill(student, teacher, windows, config, out_dir=out, resume=args.resume)
    merged = merge_lora(student).to(DTYPES[dtype])
    save_compact(merged, tokenizer, out / "model.tmp")
    ordinary_modes(out / "model.tmp")
    (out / "model.tmp").rename(out / "model")
    print(size_line("merged model", weight_bytes(out / "model"), source_weight_bytes(args.student), dtype))
    plot_loss_curve(result, out / "loss.png")
    atomic_write_json(out / "distill.json", {"command": _command_line(), "data": data.describe(), **result.to_dict()})
    ordinary_modes(out)  # the loss plot's temp file, like every output, readable as the umask allows
    print(f"{result.steps_done} steps in {result.seconds / 60:.1f} min; merged model in {out}/model, loss curve {out}/loss.png")
    return 0


def run_export(args: Namespace) -> int:
    from leanlm.cli_support import size_line, source_weight_bytes, weight_bytes
    from leanlm.export import export_model, model_card, previous_steps, size_metrics, stock_layout
    from leanlm.models import ModelSpec, load_model, load_tokenizer
    from leanlm.models.loading import source_dtype
    from leanlm.report import check_new_output

    check_new_output(args.out)
    dtype = args.dtype or source_dtype(args.model)
    model, tokenizer = load_model(args.model, dtype, args.device), load_tokenizer(args.model)
    spec = ModelSpec.from_model(model)
    steps = [*previous_steps(args.model), f"Exported `{args.model}` in {dtype}."]  # the source's card history carries over
    card = model_card(f"{args.model}, exported by leanlm", steps, size_metrics(model), spec, stock=stock_layout(model))
    exported = export_model(model, tokenizer, args.out, card, padded=not args.no_padded)
    print(size_line("exported model", weight_bytes(exported.path), source_weight_bytes(args.model), dtype))
    kind = "stock transformers checkpoint" if exported.stock_loadable else "leanlm compact checkpoint"
    print(f"wrote {exported.path} ({kind})" + (f" and {exported.padded_path} (stock, padded)" if exported.padded_path else ""))
    return 0
