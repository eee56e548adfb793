"""Benchmark: SentenceKV's coarse tier — reconstruction error vs bit savings, and the trained maps.

    .venv/bin/python benchmarks/sentence_reconstruction.py --out runs/sentence_reconstruction.json

For each maximum sentence length L (sentences also close at ., !, ?, newline): segment real windows
the way `sentence_tier` does, then, per layer, compare attention over sinks + the closed sentences'
real tokens with three cheap stand-ins — drop them (sinks only), one mean-only pseudo-token per
sentence, one *learned* pseudo-token per sentence (`leanlm.kvcache.sentence.coarse`) — as the relative
error of the attention output. The maps are trained on WikiText-2 *validation* windows and the error
is measured on *test* windows (held out). The bytes saved: a sentence of n tokens keeps 2 vectors
(mean key, mean value) instead of 2n. Writes FILE.json, FILE.png (error vs bytes kept) and the maps
of each L under --maps-dir (`coarse=learned,maps=PATH` in `--kv-cache sentence_tier:...`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from leanlm.data import nonoverlapping_windows, tokenize_split  # noqa: E402
from leanlm.errors import LeanLMError  # noqa: E402
from leanlm.kvcache.sentence.coarse import CoarseMaps, attention_errors, collect, fit  # noqa: E402
from leanlm.kvcache.sentence import boundary_token_ids  # noqa: E402
from leanlm.models import load_model, load_tokenizer  # noqa: E402
from leanlm.report import atomic_write_json, git_info, versions  # noqa: E402

DEFAULT_MAPS_DIR = Path.home() / ".cache" / "leanlm" / "coarse-maps"


def windows(tokenizer, split: str, length: int, count: int) -> list[torch.Tensor]:
    ids = tokenize_split(tokenizer, split, join="paper")
    return [ids[w.start:w.end] for w in nonoverlapping_windows(len(ids), length)[:count]]


def mean_sentence_length(samples) -> float:
    lengths = []
    for window in samples:
        ids = window[0].sentence
        counts = torch.bincount(ids[ids >= 0])
        lengths += counts[:-1].tolist()  # closed sentences only (the last may be cut by the window)
    return statistics.fmean(lengths)


def maps_path(maps_dir: Path, model: str, max_sentence: int) -> Path:
    return maps_dir / f"{Path(model).name}-s{max_sentence}.safetensors"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-sentence", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64])
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--train-windows", type=int, default=12, help="WikiText-2 validation windows to train on")
    p.add_argument("--test-windows", type=int, default=6, help="WikiText-2 test windows to measure on")
    p.add_argument("--queries", type=int, default=64, help="query positions per window (second half)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--maps-dir", type=Path, default=DEFAULT_MAPS_DIR)
    args = p.parse_args()
    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
    if args.sink < 1:
        raise LeanLMError("--sink must be at least 1 (a query must see something when every sentence is dropped)")
    model, tok = load_model(args.model, "float32"), load_tokenizer(args.model)
    table = boundary_token_ids(tok)
    train_windows = windows(tok, "validation", args.window, args.train_windows)
    test_windows = windows(tok, "test", args.window, args.test_windows)
    args.maps_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for max_sentence in args.max_sentence:
        started = time.perf_counter()
        train = collect(model, train_windows, table, max_sentence, args.sink, args.queries, seed=0)
        held = collect(model, test_windows, table, max_sentence, args.sink, args.queries, seed=1)
        maps = CoarseMaps.identity(model)
        train_loss = fit(maps, train, steps=args.steps)
        errors = attention_errors(maps, held)
        path = maps_path(args.maps_dir, args.model, max_sentence)
        maps.save(path)
        n = mean_sentence_length(held)
        rows.append({"max_sentence": max_sentence, "mean_sentence_tokens": n, "bytes_kept_fraction": 1 / n,
                     "error": {k: statistics.fmean(v) for k, v in errors.items()}, "error_per_layer": errors,
                     "train_loss_per_layer": train_loss, "maps": str(path), "seconds": time.perf_counter() - started})
        e = rows[-1]["error"]
        print(f"L={max_sentence:3d}  n̄={n:5.1f}  drop {e['drop']:.4f}  mean {e['mean']:.4f}  learned {e['learned']:.4f}",
              file=sys.stderr, flush=True)
        del train, held
    result = {"rows": rows, "protocol": {
        "model": args.model, "window": args.window, "sink": args.sink, "queries_per_window": args.queries,
        "train": f"WikiText-2 validation, {args.train_windows} windows", "test": f"WikiText-2 test, {args.test_windows} windows",
        "error": "sum ||approx - target||^2 / sum ||target||^2 of the attention output over sinks + closed sentences, "
                 "mean over layers; query positions from each window's second half",
        "steps": args.steps, "boundaries": "tokenizer table (., !, ?, newline) + max_sentence"},
        "command": " ".join(sys.argv), "versions": versions(), "git": git_info()}
    atomic_write_json(args.out, result)
    plot(rows, args.out.with_suffix(".png"))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["bytes_kept_fraction"] for r in rows]
    for key, style in (("drop", "x:"), ("mean", "o--"), ("learned", "s-")):
        ax.plot(x, [r["error"][key] for r in rows], style, label=key)
    for r in rows:
        ax.annotate(f"L={r['max_sentence']}", (r["bytes_kept_fraction"], r["error"]["learned"]), fontsize=8)
    ax.set_xlabel("bytes kept per closed sentence (fraction of its token K/V)")
    ax.set_ylabel("relative attention-output error (held-out)")
    ax.set_title("SentenceKV coarse tier: error vs bit savings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LeanLMError as err:
        print(f"sentence_reconstruction: error: {err}", file=sys.stderr)
        sys.exit(2)
