"""Benchmark: cache bytes and decode speed at long context of a PostNAS recipe's model against the original.

    LEANLM_DATA_DIR=../shared/data PYTHONPATH=src:benchmarks .venv/bin/python benchmarks/postnas_decode.py \
        --out runs/postnas/decode16k.json [--recipe recipes/smollm2-postnas15.yaml] [--compile]

The recipe's ``swap_attention`` transforms are applied to a copy of the original (sliding windows have no
parameters: nothing to recover). Both models prefill the first ``--contexts[-1]`` tokens of WikiText-2 test in
chunks (cache bytes measured from the cache at each of ``--contexts``), the cache goes to a static cache
(the swapped layers as rings), then ``--rounds`` rounds alternate the two models, each decoding
``--new-tokens`` greedy tokens through the engine's lean step (after ``--warmup`` untimed tokens, which also
compile it with ``--compile``); medians and their ratio (``benchmarks/postnas.py``'s ``bytes_and_speed``). Past the
model's 8,192 positions RoPE extrapolates: only bytes and speed are measured there.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from postnas import bytes_and_speed  # noqa: E402

from leanlm.data.windows import tokenize_split  # noqa: E402
from leanlm.errors import LeanLMError  # noqa: E402
from leanlm.models import load_model, load_tokenizer  # noqa: E402
from leanlm.recipe import load_recipe  # noqa: E402
from leanlm.report import atomic_write_json, git_info, versions  # noqa: E402


def swapped_copy(model, recipe):
    """A copy of ``model`` with the recipe's swap_attention transforms applied (other transforms: refused)."""
    swapped = copy.deepcopy(model)
    for transform in recipe.transforms:
        if transform.name != "swap_attention":
            raise LeanLMError(f"this benchmark applies swap_attention transforms only, the recipe has {transform.name!r}")
        transform.apply(swapped)
    return swapped


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipe", type=Path, default=Path("recipes/smollm2-postnas15.yaml"))
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 4096, 16384])
    p.add_argument("--new-tokens", type=int, default=16, help="timed greedy tokens per run")
    p.add_argument("--warmup", type=int, default=4, help="untimed tokens per model before the first round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk")
    p.add_argument("--compile", action="store_true", help="the compiled lean step (default: eager)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    original, tok = load_model(recipe.model, "bfloat16"), load_tokenizer(recipe.model)
    models = {"original": original, "swapped": swapped_copy(original, recipe)}
    ids = tokenize_split(tok, "test", "paper")[: args.contexts[-1]]
    settings = argparse.Namespace(chunk=args.chunk, decode_tokens=args.new_tokens, speed_rounds=args.rounds,
                                  warmup=args.warmup, compile=args.compile)
    load_before = list(os.getloadavg())
    with torch.inference_mode():
        speed = bytes_and_speed(models, ids, args.contexts, settings)
    decode = speed["swapped"]["decode"]
    bytes_ratio = {str(c["context"]): c["bytes"] / b["bytes"]
                   for c, b in zip(speed["swapped"]["curve"], speed["original"]["curve"])}
    result = {"command": " ".join(sys.argv), "recipe": str(args.recipe), "threads": args.threads,
              "load_average": {"start": load_before, "end": list(os.getloadavg())},
              "bytes_and_speed": speed, "cache_bytes_ratio": bytes_ratio, "decode_speed_ratio": decode["ratio"],
              "note": "speeds only as the side-by-side ratio", "versions": versions(), "git": git_info()}
    atomic_write_json(args.out, result)
    print(f"cache bytes swapped / original: {bytes_ratio}")
    print(f"decode at {args.contexts[-1]}: original {decode['base']:.2f} tok/s, swapped {decode['candidate']:.2f} tok/s, "
          f"ratio {decode['ratio']:.3f} (runs {[round(r, 2) for r in decode['base_runs']]} / "
          f"{[round(r, 2) for r in decode['runs']]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
