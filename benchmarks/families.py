"""One model family's numbers: size, KV bytes per token, and every KV policy against the full cache.

    PYTHONPATH=src python benchmarks/families.py --model gemma3-270m --out runs/families/gemma3-270m.json

Rows (continuation protocol: prefill ``--context`` tokens, compress, score the next ``--continuation``):
the full cache (the reference), then each policy of ``CACHE_POLICIES`` at each ``--budgets`` value:
perplexity ratio to the full cache, KL to it, and resident bytes right after the prefill over the
full cache's (Gemma 3's full cache already bounds its sliding layers to their window, so a policy,
which compresses only the global layers, saves less there). The JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from leanlm.evaluate.kv import ContinuationProtocol, continuation_perplexity, continuation_reference
from leanlm.evaluate.memory import memory_report
from leanlm.kvcache import CACHE_POLICIES, make_policy
from leanlm.models import ModelSpec, arch_of, load_model, load_tokenizer
from leanlm.report import atomic_write_text


def continuation_parser(doc: str, windows: int) -> argparse.ArgumentParser:
    """--model, --out and the continuation protocol's windows (shared with context_truncation.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--windows", type=int, default=windows)
    return parser


def main() -> None:
    parser = continuation_parser(__doc__, windows=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budgets", default="0.25", help="comma list of KV budgets")
    parser.add_argument("--policies", default=",".join(sorted(CACHE_POLICIES)))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype=args.dtype), load_tokenizer(args.model)
    spec = ModelSpec.from_model(model)
    memory = memory_report(model)
    protocol = ContinuationProtocol(context=args.context, continuation=args.continuation, windows=args.windows)
    record = {"model": args.model, "family": arch_of(model).family.name, "spec": spec.to_dict(),
              "params": memory.params, "kv_bytes_per_token": memory.kv_bytes_per_token,
              "kv_bytes_per_token_analytic": memory.kv_bytes_per_token_analytic,
              "protocol": protocol.record(model), "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    reference = continuation_reference(model, tokenizer, protocol)
    full = reference.result.to_dict()
    record["rows"].append({"policy": "full", "budget": 1.0, "perplexity": full["perplexity"],
                           "bytes_per_token": full["bytes_per_token"], "seconds": time.perf_counter() - start})
    atomic_write_text(out, json.dumps(record, indent=2))
    for budget in map(float, args.budgets.split(",")):
        for name in args.policies.split(","):
            start = time.perf_counter()
            policy = make_policy(name, budget, args.context, tokenizer, model)
            result = continuation_perplexity(model, tokenizer, policy, protocol, reference=reference).to_dict()
            record["rows"].append({
                "policy": name, "budget": budget, "settings": policy.describe(), "perplexity": result["perplexity"],
                "ppl_ratio": result["perplexity"] / result["reference_perplexity"], "kl": result["kl"],
                "bytes_ratio": result["bytes_per_token"] / result["reference_bytes_per_token"],
                "seconds": time.perf_counter() - start,
            })
            atomic_write_text(out, json.dumps(record, indent=2))
            print(json.dumps(record["rows"][-1]), flush=True)


if __name__ == "__main__":
    main()
