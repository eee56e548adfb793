"""Benchmark: int8 / int4 weight-only quantization of the real model against bf16, side by side.

    LEANLM_DATA_DIR=../shared/data PYTHONPATH=src .venv/bin/python benchmarks/weight_quant.py --out runs/weight_quant.json

For each variant (bf16, int8, int4 for each of --group-sizes, int4 with an int8 output head for each of
--int8-head-groups, int4 with the activation-aware
scale search on WikiText-2 validation for each of --awq-groups) in one process: WikiText-2 test perplexity
(sliding windows 1024/512 over the first --max-tokens tokens) and the same on the out-of-domain
text (Botchan) — by default with every matmul on the decode kernels (``--ppl-path decode``: the int8 and
int4 kernels round their inputs to int8, so that is what the model decodes with), bytes of every parameter and buffer held, and decode tokens/s of a plain greedy
loop (the first --prompt-tokens tokens of WikiText-2 validation, then --new-tokens steps through a DynamicCache), timed in
alternating rounds (bf16, int8, int4, bf16, ...) with medians; the machine is shared, so only the
ratios measured together mean anything. Also a matmul micro-benchmark (one MLP up projection and
the output head, batch 1 and 8) of the float kernel against the packed int8/int4 kernels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from leanlm.data.windows import calibration_batches, tokenize_split
from leanlm.errors import LeanLMError
from leanlm.evaluate.perplexity import PerplexityProtocol, perplexity
from leanlm.models import load_model, load_tokenizer
from leanlm.models.compat import with_cache
from leanlm.report import atomic_write_json, git_info, versions
from leanlm.transforms.quantize import Int4Linear, Int8Linear, held_bytes, quantize_weights
from leanlm.transforms.quantize.base import use_kernel_for_every_call


@torch.inference_mode()
def greedy_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Prefill ``prompt`` (1, P), then ``new_tokens`` greedy steps; returns (decode seconds, tokens)."""
    cache = DynamicCache(config=model.config)
    logits = model(prompt, **with_cache(cache), use_cache=True, logits_to_keep=1).logits  # (1, 1, vocab)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    out = [token.item()]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = model(token, **with_cache(cache), use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token.item())
    return time.perf_counter() - start, out


def decode_side_by_side(models: dict, prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict:
    """Alternate the models each round; decode tokens/s median per model, and the greedy tokens."""
    for model in models.values():  # warm-up
        greedy_decode(model, prompt, 4)
    times = {name: [] for name in models}
    tokens = {}
    for _ in range(rounds):
        for name, model in models.items():
            seconds, tokens[name] = greedy_decode(model, prompt, new_tokens)
            times[name].append(seconds)
    steps = new_tokens - 1
    return {
        name: {
            "decode_tokens_per_s_median": steps / statistics.median(t),
            "decode_tokens_per_s_runs": [steps / s for s in t],
            "greedy_tokens": tokens[name],
        }
        for name, t in times.items()
    }


def _median_us(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


@torch.inference_mode()
def matmul_micro(model, group_size: int, rounds: int) -> list[dict]:
    """bf16 F.linear vs the int8 / int4 packed kernels on one up projection and the output head."""
    layers = {"mlp.up_proj": model.model.layers[0].mlp.up_proj, "lm_head": model.lm_head}
    rows = []
    for name, linear in layers.items():
        kernels = {"bf16": linear, "int8": Int8Linear.from_float(linear.weight, None, 0),
                   "int4": Int4Linear.from_float(linear.weight, None, group_size)}
        repeats = 20 if linear.out_features > 10_000 else 200
        for batch in (1, 8):
            x = torch.randn(batch, linear.in_features, dtype=linear.weight.dtype)
            runs = {k: [] for k in kernels}
            for _ in range(rounds):
                for k, mod in kernels.items():
                    runs[k].append(_median_us(lambda mod=mod: mod(x), repeats))
            med = {k: statistics.median(v) for k, v in runs.items()}
            rows.append({"layer": name, "shape": [linear.out_features, linear.in_features], "batch": batch,
                         "us_median": med, "speedup_vs_bf16": {k: med["bf16"] / v for k, v in med.items()}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (never overwritten)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[64, 32],
                        help="int4 group sizes, one variant each (SmolLM2: 32 or 64 divide 576)")
    parser.add_argument("--int8-head-groups", type=int, nargs="*", default=[32],
                        help="int4 group sizes to also quantize with the output head (= tied embedding) at int8")
    parser.add_argument("--awq-groups", type=int, nargs="*", default=[64],
                        help="int4 group sizes to also quantize with the activation-aware scale search")
    parser.add_argument("--calibration", type=int, nargs=2, default=[8, 256], metavar=("SAMPLES", "LEN"),
                        help="WikiText-2 validation windows for the scale search")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens of each text scored for perplexity")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="alternating decode rounds (median)")
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity (speed and bytes only)")
    parser.add_argument("--ppl-path", choices=("decode", "prefill"), default="decode",
                        help="decode: every matmul through the packed decode kernels (they round their inputs to int8), "
                             "so the perplexity is what decoding computes; prefill: long inputs dequantize the weight")
    args = parser.parse_args()
    try:
        if args.out.exists():
            raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
        torch.manual_seed(0)
        if args.threads:
            torch.set_num_threads(args.threads)
        tokenizer = load_tokenizer(args.model)
        base = load_model(args.model, "bfloat16")
        models, reports = {"bf16": base}, {}
        variants = [("int8", "int8", 0, None)] + [(f"int4-g{g}", "int4", g, None) for g in args.group_sizes]
        variants += [(f"int4-g{g}-head8", "int4", g, "int8") for g in args.int8_head_groups]
        for name, scheme, group, head in variants:
            models[name] = copy.deepcopy(base)
            reports[name] = quantize_weights(models[name], scheme, group, head=head)
        if args.awq_groups:
            calibration = calibration_batches(tokenizer, args.calibration[0], args.calibration[1], batch_size=4)
        for group in args.awq_groups:
            name, start = f"int4-g{group}-awq", time.perf_counter()
            models[name] = copy.deepcopy(base)
            reports[name] = quantize_weights(models[name], "int4", group, calibration=calibration)
            reports[name]["seconds"] = time.perf_counter() - start
        results = {"model": args.model, "threads": torch.get_num_threads(), "ppl_path": args.ppl_path,
                   "note": "shared 2-core machine: compare ratios within this run only",
                   "quantize_reports": reports, "variants": {}}
        for name, model in models.items():
            row = {"weight_bytes_held": held_bytes(model)}
            if not args.no_ppl:
                for split in ("test", "botchan"):
                    protocol = PerplexityProtocol(split=split, window=1024, stride=512, max_tokens=args.max_tokens)
                    with use_kernel_for_every_call(args.ppl_path == "decode"):
                        res = perplexity(model, tokenizer, protocol)
                    row[f"ppl_{split}"], row[f"protocol_{split}"] = res.perplexity, res.protocol
            results["variants"][name] = row
            print(name, {k: v for k, v in row.items() if not k.startswith("protocol")}, flush=True)
        prompt = tokenize_split(tokenizer, "validation")[None, : args.prompt_tokens]  # (1, P): fixed, real text
        speed = decode_side_by_side(models, prompt, args.new_tokens, args.rounds)
        results["decode"] = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds, **speed}
        results["micro_matmul"] = matmul_micro(base, args.group_sizes[0], rounds=3)
        bf = results["variants"]["bf16"]
        for name, row in results["variants"].items():
            row["bytes_ratio_vs_bf16"] = bf["weight_bytes_held"] / row["weight_bytes_held"]
            row["decode_speedup_vs_bf16"] = (speed[name]["decode_tokens_per_s_median"] / speed["bf16"]["decode_tokens_per_s_median"])
            row["greedy_tokens_equal_bf16"] = sum(a == b for a, b in zip(speed[name]["greedy_tokens"], speed["bf16"]["greedy_tokens"]))
            for split in ("test", "botchan"):
                if f"ppl_{split}" in row:
                    row[f"ppl_ratio_{split}"] = row[f"ppl_{split}"] / bf[f"ppl_{split}"]
        results["versions"], results["git"] = versions(), git_info()
        atomic_write_json(args.out, results)
        for name, row in results["variants"].items():
            print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if not k.startswith("protocol")})
        print(f"wrote {args.out}")
        return 0
    except LeanLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
