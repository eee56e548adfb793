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
