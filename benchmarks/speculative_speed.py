"""Benchmark: speculative decoding against the plain engine at batch 1, on real text, side by side.

    LEANLM_DATA_DIR=../shared/data PYTHONPATH=src python benchmarks/speculative_speed.py \
        --out runs/speed/speculative.json [--prompts 8] [--new 128] [--ks 2,4,6] [--draft-model every_other]

Prompts are --prompt-tokens-token spans of WikiText-2 test and of the out-of-domain text (Botchan),
spread over each text. Every method first runs once untimed on the first prompt (a compiled chain of
k + 1 tokens compiles there; prompts have one length), then, per prompt, --rounds times in alternation (A, B, C, A, B, C ...); the per-prompt ratio is the
median method tokens/s over the median plain tokens/s, and the table reports the median over prompts.
Tokens/s counts decode only: from the first new token (after the target's prefill, and the draft
model's) to the last, the same for every method. Every speculative run's greedy output is compared
token for token with the plain engine's. Methods: ``plain`` (the engine's compiled lean step),
``ngram_kK`` (prompt lookup, engine/drafters.py), and with --draft-model a layer-pruned copy of the
target as the draft (``model_kK``; no recovery: its acceptance shows what an untrained draft gives).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from leanlm.data.texts import eval_text
from leanlm.data.wikitext import wikitext_text
from leanlm.engine import SamplingConfig, stream
from leanlm.engine.speculative import SpeculativeStats, speculative_generate
from leanlm.evaluate.side_by_side import alternate
from leanlm.models import load_model, load_tokenizer
from leanlm.report import atomic_write_json, atomic_write_text, git_info, versions
from leanlm.transforms.prune_layers import prune_layers

DRAFT_LAYERS = {"every_other": lambda n: range(1, n - 1, 2), "first10": lambda n: range(10, n)}  # layers removed


def prompts(tokenizer, count: int, length: int) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, text in (("wikitext_test", wikitext_text("test")), ("botchan", eval_text("botchan")[0])):
        ids = tokenizer(text)["input_ids"]
        stride = (len(ids) - length) // count
        out += [(name, torch.tensor([ids[i * stride: i * stride + length]])) for i in range(count)]
    return out


def plain(model, ids, new, sampling):
    times, tokens = [], []
    for token in stream(model, ids, new, sampling=sampling, compile=True):
        times.append(time.perf_counter())
        tokens.append(int(token[0]))
    return {"tokens_per_s": (new - 1) / (times[-1] - times[0]), "tokens": tokens}


def speculative(model, draft, k, ids, new, sampling):
    stats = SpeculativeStats()
    tokens = speculative_generate(model, draft, ids, new, k=k, sampling=sampling, compile=True, stats=stats)
    return {"tokens_per_s": (new - 1) / stats.decode_seconds, "tokens": tokens[0].tolist(),
            "acceptance_rate": stats.acceptance_rate, "rounds": stats.rounds, "proposed": stats.proposed}


def summarise(name: str, per_prompt: list[dict]) -> dict:
    ratios = [p["ratio"] for p in per_prompt]
    row = {"method": name, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios),
           "median_tokens_per_s": statistics.median(p["tokens_per_s"] for p in per_prompt), "prompts": len(per_prompt)}
    for text in sorted({p["text"] for p in per_prompt}):
        row[f"median_ratio_{text}"] = statistics.median(p["ratio"] for p in per_prompt if p["text"] == text)
    if "acceptance_rate" in per_prompt[0]:
        row["acceptance_rate"] = statistics.median(p["acceptance_rate"] for p in per_prompt)
        row["tokens_per_round"] = statistics.median(p["tokens_per_round"] for p in per_prompt)
        if per_prompt[0]["identical"] is not None:
            row["identical_to_plain"] = sum(p["identical"] for p in per_prompt)
    return row


def table(rows: list[dict], report: dict) -> str:
    lines = [f"Speculative decoding at batch 1, {report['protocol']['new_tokens']} new tokens, "
             f"{report['protocol']['sampling']}; ratios are per-prompt medians of alternated runs.\n",
             "| method | tokens/s (median) | vs plain (median over prompts) | WikiText-2 test | Botchan | min..max | "
             "acceptance | tokens per round | identical to plain |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        identical = f"{r['identical_to_plain']}/{r['prompts']}" if "identical_to_plain" in r else "n/a (sampling)"
        lines.append(f"| {r['method']} | {r['median_tokens_per_s']:.1f} | {r['median_ratio']:.2f}x | "
                     f"{r.get('median_ratio_wikitext_test', float('nan')):.2f}x | {r.get('median_ratio_botchan', float('nan')):.2f}x | "
                     f"{r['min_ratio']:.2f}..{r['max_ratio']:.2f} | {r.get('acceptance_rate', float('nan')):.2f} | "
                     f"{r.get('tokens_per_round', float('nan')):.2f} | {identical} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per text (WikiText-2 test, Botchan)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ks", default="2,4,6", help="n-gram drafter: tokens proposed per round")
    parser.add_argument("--draft-model", choices=sorted(DRAFT_LAYERS), default=None,
                        help="also a layer-pruned copy of the target as the draft (model_kK rows, k = the middle of --ks)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampling (top-k 50)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, "bfloat16"), load_tokenizer(args.model)
    sampling = SamplingConfig(temperature=args.temperature)
    ks = [int(k) for k in args.ks.split(",")]
    methods = {"plain": lambda ids: plain(model, ids, args.new, sampling)}
    for k in ks:
        methods[f"ngram_k{k}"] = lambda ids, k=k: speculative(model, "ngram", k, ids, args.new, sampling)
    if args.draft_model:
        draft = prune_layers(copy.deepcopy(model), list(DRAFT_LAYERS[args.draft_model](model.config.num_hidden_layers)))
        k = ks[len(ks) // 2]
        methods[f"model_k{k}"] = lambda ids: speculative(model, draft, k, ids, args.new, sampling)
    per_method: dict[str, list[dict]] = {name: [] for name in methods if name != "plain"}
    for index, (text, ids) in enumerate(prompts(tokenizer, args.prompts, args.prompt_tokens)):
        if index == 0:
            for run in methods.values():  # untimed: compiles the step and the chains
                run(ids)
        runs = alternate({name: (lambda run=run: run(ids)) for name, run in methods.items()}, args.rounds)
        base = statistics.median(r["tokens_per_s"] for r in runs["plain"])
        for name, results in runs.items():
            if name == "plain":
                continue
            speed = statistics.median(r["tokens_per_s"] for r in results)
            per_method[name].append({"text": text, "tokens_per_s": speed, "ratio": speed / base, "base_tokens_per_s": base,
                                     "acceptance_rate": results[0]["acceptance_rate"],
                                     "tokens_per_round": (args.new - 1) / results[0]["rounds"],
                                     # sampling draws other random numbers than plain decoding: only greedy can match
                                     "identical": results[0]["tokens"] == runs["plain"][0]["tokens"] if sampling.greedy else None})
            print(text, index, name, {k: v for k, v in per_method[name][-1].items() if k != "text"}, flush=True)
    rows = [summarise(name, results) for name, results in per_method.items()]
    report = {"rows": rows, "per_prompt": per_method,
              "protocol": {"batch": 1, "new_tokens": args.new, "prompt_tokens": args.prompt_tokens, "prompts_per_text": args.prompts,
                           "rounds": args.rounds, "threads": args.threads, "dtype": "bfloat16", "compiled": True,
                           "sampling": "greedy" if sampling.greedy else f"temperature {args.temperature}, top-k 50",
                           "draft_model": args.draft_model, "timing": "decode only: first new token to last",
                           "machine": "read ratios, not absolute numbers"},
              "versions": versions(), "git": git_info()}
    atomic_write_json(args.out, report)
    atomic_write_text(args.out.with_suffix(".md"), table(rows, report))
    print(table(rows, report))


if __name__ == "__main__":
    main()
