"""What each CLI sub-command does, given its parsed arguments (kept apart from argument parsing)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
from argparse import Namespace
from pathlib import Path

from leanlm.errors import LeanLMError

log = logging.getLogger("leanlm")


def _command_line() -> str:
    return "leanlm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _out_dir(args: Namespace, kind: str) -> Path:
    from leanlm.cli import default_out
    from leanlm.report import check_new_output

    from leanlm.models.loading import resolve_source

    resolve_source(args.model)  # an unknown model is reported before anything else happens
    out = args.out or default_out(kind, args.model)
    check_new_output(out)  # refuse before spending minutes on the model
    return out


def run_eval(args: Namespace) -> int:
    from leanlm.data import wikitext_lines
    from leanlm.evaluate import EvalConfig, PerplexityProtocol, SpeedConfig, evaluate, write_eval_run
    from leanlm.models import load_model, load_tokenizer
    from leanlm.report.markdown import metrics_rows, table

    if args.kv_cache is not None:
        return run_eval_kv_cache(args)
    window = args.window or (1024 if args.protocol == "sliding" else 2048)
    protocol = PerplexityProtocol(args.split, args.protocol, window, args.stride or max(1, window // 2), args.max_tokens)
    protocol.validate()
    speed = SpeedConfig(tuple(args.prefill_lengths), tuple(args.decode_batches), decode_tokens=args.decode_tokens,
                        repeats=args.speed_repeats)
    speed.validate()
    out = _out_dir(args, "eval")
    if protocol.split != "botchan":
        wikitext_lines(protocol.split)  # fail on missing data before loading the model
    log.info("loading %s (%s)", args.model, args.dtype)
    model, tokenizer = load_model(args.model, args.dtype), load_tokenizer(args.model)
    config = EvalConfig(protocol, speed, measure_speed=not args.no_speed)
    results = evaluate(model, tokenizer, config)
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
    model, tokenizer = load_model(args.model, args.dtype), load_tokenizer(args.model)
    scores = score_heads(model, tokenizer, names, num_samples=args.calib_samples, seq_len=args.calib_len, seed=args.seed)
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
                   "calibration": next(iter(scores.values())).calibration,
                   "seconds": {n: s.seconds for n, s in scores.items()}, "versions": versions(), "git": git_info()}
        atomic_write_json(stage / "results.json", summary)
        atomic_write_text(stage / "report.md", "\n".join(lines))
    print(f"wrote {out}: " + ", ".join(f"scores_{n}.json" for n in names) + ", report.md, plots/")
    return 0


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
    from leanlm.cli import default_out
    from leanlm.pipeline import run_recipe
    from leanlm.recipe import load_recipe
    from leanlm.report.pipeline_report import comparison_table

    recipe = load_recipe(args.recipe)
    if args.resume and not args.out:
        raise LeanLMError("--resume needs --out: the run directory to continue")
    out = args.out or default_out(recipe.name, recipe.model)
    results = run_recipe(recipe, out, resume=args.resume, with_reference=args.with_reference)
    print(comparison_table(results))
    print(f"\nwrote {out}/results.json, report.md, plots/ and model/")
    return 0


def run_prune(args: Namespace) -> int:
    from leanlm.analyze import SCORERS, score_heads
    from leanlm.export import export_model, model_card, stock_layout
    from leanlm.models import ModelSpec, load_model, load_tokenizer
    from leanlm.pipeline import eval_copy
    from leanlm.report import atomic_write_json, staged_output
    from leanlm.transforms import prune_heads, removed_fraction, select_heads

    if args.scorer not in SCORERS:
        raise LeanLMError(f"unknown scorer '{args.scorer}': choose from {', '.join(SCORERS)}")
    if not 0 <= args.fraction < 1:
        raise LeanLMError(f"--fraction must be in [0, 1), got {args.fraction}")
    out = _out_dir(args, "prune")
    model, tokenizer = load_model(args.model, "float32"), load_tokenizer(args.model)
    spec = ModelSpec.from_model(model)
    scores = score_heads(eval_copy(model, args.dtype), tokenizer, [args.scorer], args.calib_samples, args.calib_len)[args.scorer]
    remove = select_heads(scores, args.fraction, args.layout, args.granularity, spec)
    prune_heads(model, remove)
    fraction = removed_fraction(remove, spec)
    with staged_output(out) as stage:
        scores.save_json(stage / f"scores_{args.scorer}.json")
        steps = [f"Scored heads of `{args.model}` with `{args.scorer}` on WikiText-2 validation.",
                 f"Removed {fraction:.2%} of the query heads ({args.layout}, {args.granularity}); no recovery."]
        card = model_card(f"{args.model}, {fraction:.0%} of attention heads pruned by leanlm", steps, [],
                          ModelSpec.from_model(model), stock=stock_layout(model))
        exported = export_model(model, tokenizer, stage / "model", card)
        atomic_write_json(stage / "prune.json", {"model": args.model, "command": _command_line(),
                                                 "heads_removed": {str(k): v for k, v in remove.items()},
                                                 "heads_removed_fraction": fraction, "export": exported.to_dict()})
    print(f"removed {fraction:.2%} of the query heads; model in {out}/model" + (" (+ model-padded)" if exported.padded_path else ""))
    return 0


def run_distill(args: Namespace) -> int:
    from leanlm.models import load_model, load_tokenizer
    from leanlm.recover import DistillConfig, LoraSettings, add_lora, distill, merge_lora, plot_loss_curve, training_windows
    from leanlm.report import atomic_write_json
    from leanlm.transforms import save_compact

    config = DistillConfig(steps=args.steps, max_minutes=args.max_minutes, alpha=args.alpha,
                           temperature=args.temperature, top_k_teacher=args.top_k_teacher)
    config.check()
    settings = LoraSettings(rank=args.lora_rank, include_mlp=args.lora_mlp)
    out = Path(args.out)
    if (out / "model").exists():
        raise LeanLMError(f"'{out}/model' already exists; results are never overwritten, pick a new --out")
    student = add_lora(load_model(args.student, "float32"), settings)
    teacher, tokenizer = load_model(args.teacher, "float32"), load_tokenizer(args.student)
    result = distill(student, teacher, training_windows(tokenizer, config.seq_len), config, out_dir=out, resume=args.resume)
    merged = merge_lora(student)
    save_compact(merged, tokenizer, out / "model.tmp")
    (out / "model.tmp").rename(out / "model")
    plot_loss_curve(result, out / "loss.png")
    atomic_write_json(out / "distill.json", {"command": _command_line(), **result.to_dict()})
    print(f"{result.steps_done} steps in {result.seconds / 60:.1f} min; merged model in {out}/model, loss curve {out}/loss.png")
    return 0


def run_export(args: Namespace) -> int:
    from leanlm.export import export_model, model_card, stock_layout
    from leanlm.models import ModelSpec, load_model, load_tokenizer
    from leanlm.report import check_new_output

    check_new_output(args.out)
    model, tokenizer = load_model(args.model, "float32"), load_tokenizer(args.model)
    spec = ModelSpec.from_model(model)
    card = model_card(f"{args.model}, exported by leanlm", [f"Exported `{args.model}`."], [], spec, stock=stock_layout(model))
    exported = export_model(model, tokenizer, args.out, card, padded=not args.no_padded)
    kind = "stock transformers checkpoint" if exported.stock_loadable else "leanlm compact checkpoint"
    print(f"wrote {exported.path} ({kind})" + (f" and {exported.padded_path} (stock, padded)" if exported.padded_path else ""))
    return 0


def policy_from_args(args: Namespace, tokenizer=None):
    """The KV-cache policy the --kv-* options name, or None for the full cache."""
    from leanlm.kvcache import make_policy

    if args.kv_cache is None:
        if args.kv_positions != "original":
            raise LeanLMError("--kv-positions needs --kv-cache sink_window")
        return None
    settings = {"position_mode": args.kv_positions} if args.kv_positions != "original" else {}
    if settings and not args.kv_cache.startswith("sink_window"):
        raise LeanLMError("--kv-positions cache applies to sink_window only")
    return make_policy(args.kv_cache, args.kv_budget, args.kv_context, tokenizer, **settings)


def run_generate(args: Namespace) -> int:
    from contextlib import nullcontext

    import torch

    from leanlm.generate import SamplingConfig, stream
    from leanlm.kvcache import attach
    from leanlm.models import load_model, load_tokenizer

    policy_from_args(args)  # bad policy settings fail before the model loads
    sampling = SamplingConfig(args.temperature, args.top_k, args.seed)
    sampling.validate()
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LeanLMError("empty prompt: pass it as an argument or on stdin")
    model, tokenizer = load_model(args.model, args.dtype), load_tokenizer(args.model)
    policy = policy_from_args(args, tokenizer)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with attach(model, policy) if policy else nullcontext() as cache:
        print(prompt, end="", flush=True)
        generated: list[int] = []
        shown = ""
        for token in stream(model, ids, args.max_new_tokens, cache, sampling):
            generated.append(int(token[0]))
            text = tokenizer.decode(generated, skip_special_tokens=True)
            print(text[len(shown):], end="", flush=True)  # decode the whole tail: multi-token characters
            shown = text
            if generated[-1] == tokenizer.eos_token_id:
                break
        print()
        if cache is not None:
            log.info("kv cache (%s): %d tokens held of %d seen, %.2f MiB resident, %.2f MiB peak",
                     policy.name, cache.held_tokens(), cache.seen_tokens, cache.nbytes() / 2**20,
                     cache.peak_nbytes() / 2**20)
    return 0


def run_eval_kv_cache(args: Namespace) -> int:
    """`leanlm eval --kv-cache P`: streaming perplexity through the policy vs the full cache, same windows."""
    from leanlm.evaluate.kv import StreamingProtocol, streaming_perplexity, streaming_reference
    from leanlm.kvcache import make_policy
    from leanlm.models import load_model, load_tokenizer
    from leanlm.report import atomic_write_json, atomic_write_text, git_info, staged_output, versions
    from leanlm.report.markdown import table

    if args.split == "botchan":
        raise LeanLMError("--kv-cache evaluates on WikiText-2 (test or validation), not botchan")
    context = args.window or args.kv_context
    protocol = StreamingProtocol(args.split, context, args.kv_chunk, args.max_tokens)
    protocol.validate()
    policy_from_args(args)  # bad policy settings fail before the model loads
    out = _out_dir(args, "eval-kv")
    model, tokenizer = load_model(args.model, args.dtype), load_tokenizer(args.model)
    settings = {"position_mode": args.kv_positions} if args.kv_positions != "original" else {}
    factory = lambda tokens: make_policy(args.kv_cache, args.kv_budget, tokens, tokenizer, **settings)  # noqa: E731
    reference = streaming_reference(model, tokenizer, protocol)
    result = streaming_perplexity(model, tokenizer, factory, protocol, reference=reference)
    full = reference.result
    results = {"model": args.model, "command": _command_line(), "perplexity": result.perplexity,
               "protocol": result.protocol, "kv_cache": result.policy, "kv_budget": args.kv_budget,
               "kv_bytes_per_token": result.bytes_per_token, "kv_peak_bytes": result.peak_bytes,
               "ppl_ratio": result.perplexity / full.perplexity, "kl": result.kl,
               "top1_agreement": result.top1_agreement,
               "uncompressed": {"perplexity": full.perplexity, "kv_bytes_per_token": full.bytes_per_token},
               "bytes_ratio": result.bytes_per_token / full.bytes_per_token,
               "details": result.to_dict(), "versions": versions(), "git": git_info()}
    rows = [("perplexity (policy / full)", f"{result.perplexity:.3f} / {full.perplexity:.3f}  "
                                           f"(x{results['ppl_ratio']:.4f})"),
            ("KL to full cache (nats/token)", f"{result.kl:.5f}"),
            ("top-1 agreement", f"{result.top1_agreement:.4f}"),
            ("KV bytes/token (policy / full)", f"{result.bytes_per_token:,.0f} / {full.bytes_per_token:,.0f}  "
                                               f"({results['bytes_ratio']:.3f})"),
            ("protocol", f"{protocol.split}, windows of {context}, chunks of {protocol.chunk}, "
                         f"{result.tokens_scored} tokens scored, {result.protocol['dtype']}")]
    text = table(rows, header=("metric", args.kv_cache))
    with staged_output(out) as stage:
        atomic_write_json(stage / "results.json", results)
        atomic_write_text(stage / "report.md", f"# KV-cache policy {args.kv_cache} at budget {args.kv_budget}\n\n"
                                               f"{text}\n\nCommand: `{results['command']}`\n")
    print(text)
    print(f"\nwrote {out}/results.json and {out}/report.md")
    return 0
