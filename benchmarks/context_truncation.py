"""How much a text's continuation needs its distant context: perplexity with the context cut to a few tokens.

    PYTHONPATH=src python benchmarks/context_truncation.py --model qwen2.5-0.5b --keep 256,512 --out F.json

The windows of `benchmarks/families.py` (continuation protocol: ``--context`` tokens, then the next
``--continuation`` scored). For each ``--keep`` k the model sees only the first 4 tokens (the attention
sinks) and the last k - 4 context tokens before the continuation, re-positioned from 0, with no cache
policy at all: the loss a policy keeping k tokens cannot beat by choosing *which* tokens only if the
text is what costs it. Rows: perplexity and its ratio to the whole context's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from leanlm.evaluate.kv import ContinuationProtocol, continuation_windows
from leanlm.models import load_model, load_tokenizer
from leanlm.report import atomic_write_text

from families import continuation_parser  # the same windows as the policy table

SINKS = 4


def continuation_nll(model, ids: list[int], scored: int) -> float:
    """Summed negative log-likelihood of the last ``scored`` tokens of ``ids`` (one forward)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -scored - 1:-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[-scored:]), reduction="sum").item()


def main() -> None:
    parser = continuation_parser(__doc__, windows=4)
    parser.add_argument("--keep", default="256,512", help="comma list of context tokens kept (sinks included)")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype="bfloat16"), load_tokenizer(args.model)
    protocol = ContinuationProtocol(context=args.context, continuation=args.continuation, windows=args.windows)
    windows = continuation_windows(tokenizer, protocol)
    scored = args.continuation * len(windows)
    full = sum(continuation_nll(model, w, args.continuation) for w in windows)
    record = {"model": args.model, "protocol": protocol.record(model), "sinks": SINKS,
              "full_ppl": math.exp(full / scored), "rows": []}
    for keep in (int(k) for k in args.keep.split(",")):
        cut = sum(continuation_nll(model, w[:SINKS] + w[args.context - (keep - SINKS):], args.continuation)
                  for w in windows)
        record["rows"].append({"keep": keep, "ppl": math.exp(cut / scored), "ppl_ratio": math.exp((cut - full) / scored)})
        print(json.dumps(record["rows"][-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
