"""Acceptance rate of layer-pruned drafts on real text (WikiText-2 test), greedy, per k.

    PYTHONPATH=src python benchmarks/speculative_acceptance.py --out out/spec_accept.json [--new 32]

Acceptance is a property of the pair (target, draft), not of the machine, so unlike speed it does not
need side-by-side timing. Each draft is the target with layers removed by ``prune_layers`` (no recovery).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from leanlm.data.wikitext import wikitext_text
from leanlm.engine import generate
from leanlm.engine.speculative import SpeculativeStats, speculative_generate
from leanlm.models import load_model, load_tokenizer
from leanlm.transforms.prune_layers import prune_layers

DRAFTS = {"first10": lambda n: range(10, n), "first10+last4": lambda n: range(10, n - 4),
          "every_other": lambda n: range(1, n - 1, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--ks", default="2,4,6")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m", "bfloat16"), load_tokenizer("smollm2-135m")
    text = wikitext_text("test")[5000:7000]
    ids = torch.tensor([tokenizer(text)["input_ids"][:256]])
    reference = generate(model, ids, args.new)
    rows = []
    for name, remove in DRAFTS.items():
        draft = prune_layers(copy.deepcopy(model), list(remove(model.config.num_hidden_layers)))
        for k in (int(k) for k in args.ks.split(",")):
            stats = SpeculativeStats()
            tokens = speculative_generate(model, draft, ids, args.new, k=k, stats=stats)
            rows.append({"draft": name, "draft_layers": draft.config.num_hidden_layers, "k": k,
                         "acceptance_rate": stats.acceptance_rate, "rounds": stats.rounds,
                         "identical_to_greedy": bool(torch.equal(tokens, reference))})
            print(rows[-1], flush=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
