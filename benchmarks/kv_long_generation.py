"""Benchmark: cache memory stays flat over a long generation with a bounded policy.

    .venv/bin/python benchmarks/kv_long_generation.py --out runs/kv/long_generation.json --tokens 16384

Generates --tokens tokens (seeded top-k sampling) from SmolLM2-135M through sink_window with cache
positions (4 sinks + 252 recent tokens, StreamingLLM's way: positions never pass the cache size, so
generation can run past the model's 8192-token training length), sampling the cache's resident
bytes, the tokens it holds and the process RSS every --sample-every tokens. Writes FILE.json and
FILE.png (bytes and RSS vs tokens generated). --policy full runs the uncompressed cache instead,
for comparison (its cache grows linearly).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.evaluate.kv import LongGenerationProtocol, long_generation, plot_long_generation
from leanlm.kvcache import SinkWindow
from leanlm.models import load_model, load_tokenizer
from leanlm.report import atomic_write_json, git_info, versions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (never overwritten)")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--sample-every", type=int, default=256)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=252)
    parser.add_argument("--policy", choices=["sink_window", "full"], default="sink_window")
    args = parser.parse_args()
    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
    model, tok = load_model("smollm2-135m", "bfloat16"), load_tokenizer("smollm2-135m")
    policy = SinkWindow(sink=args.sink, window=args.window, position_mode="cache") if args.policy != "full" else None
    protocol = LongGenerationProtocol(new_tokens=args.tokens, sample_every=args.sample_every)
    result = long_generation(model, tok, policy, protocol).to_dict()
    bytes_after_fill = [b for b, held in zip(result["cache_bytes"], result["held_tokens"])
                        if held >= args.sink + args.window]
    summary = {"cache_bytes_min_after_fill": min(bytes_after_fill, default=None),
               "cache_bytes_max_after_fill": max(bytes_after_fill, default=None),
               "rss_mib_first": result["rss_mib"][0], "rss_mib_last": result["rss_mib"][-1],
               "rss_mib_max": max(result["rss_mib"])}
    atomic_write_json(args.out, {"summary": summary, "result": result, "versions": versions(), "git": git_info()})
    plot_long_generation(result, args.out.with_suffix(".png"))
    print(summary)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LeanLMError as err:
        print(f"kv_long_generation: error: {err}", file=sys.stderr)
        sys.exit(2)
