"""Command-line parts of data and evaluation texts (torch-free: `--help` stays fast).

- ``--data SPEC`` for analyze / prune / distill (``add_data_arg``), checked while parsing;
- ``leanlm data``: prepare and inspect a data setting (generates and caches teacher text), print its record.

SPEC: items separated by commas, each SOURCE[:ARGS][@WEIGHT]:
  wikitext                                    WikiText-2 validation (the default)
  teacher                                     text sampled from the original model (generated once, cached)
  teacher:tokens=80000:seed=1                 a source's settings as key=value, colon-separated
  file:notes/*.md  file:corpus/  notes.txt    UTF-8 file, directory or glob (an existing path alone works)
  jsonl:data.jsonl:text                       the 'text' field of each JSON line (field defaults to text)
  hf:wikitext:wikitext-103-raw-v1:train:text  a hub dataset NAME[:CONFIG]:SPLIT:FIELD (online, `datasets`)
  teacher@0.5,wikitext@0.5                    a mix: weights are shares of the windows (normalised)
teacher settings: tokens (40000), max_new_tokens (256), min_new_tokens (16), batch_size (16),
temperature (1.0), top_k (0 = all), prompts (mixed | bos | text | chat), seed (0), dtype (bfloat16).
"""

from __future__ import annotations

import argparse
import json
from argparse import Namespace

from leanlm.errors import LeanLMError

HINT = "wikitext, teacher, file:PATH, jsonl:PATH:FIELD, hf:NAME[:CONFIG]:SPLIT:FIELD (mix with @WEIGHT, e.g. teacher@0.5,wikitext@0.5)"
DATA_HELP = f"calibration / training text: {HINT}; see `leanlm data --help` (default: wikitext = WikiText-2 validation)"
SPEC_HELP = __doc__[__doc__.index("SPEC:"):]


def data_spec(text: str):
    """argparse type: a parsed, checked ``DataMix`` (a bad spec is one line, exit 2)."""
    from leanlm.data.sources import DataMix

    try:
        return DataMix.parse(text)
    except LeanLMError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=data_spec, default=None, metavar="SPEC", help=DATA_HELP)


def add_parser(sub) -> argparse.ArgumentParser:
    from leanlm.cli import add_device_arg

    parser = sub.add_parser("data", help="prepare and inspect calibration / distillation data (generates teacher text once)",
                            description="Read a data setting, generating and caching teacher text if it names it, and "
                                        "print what it gives: sources, paths, sha256, tokens, windows, teacher speed.\n\n"
                                        + SPEC_HELP)
    parser.add_argument("--model", default="smollm2-135m", help="the original model: its tokenizer, and what teacher "
                                                                "text is sampled from (default: %(default)s)")
    add_device_arg(parser)
    add_data_arg(parser)
    parser.add_argument("--seq-len", type=int, default=256, help="window length (default: %(default)s)")
    parser.add_argument("--show", type=int, default=0, help="decode and print the first N windows (default: 0)")
    return parser


def run(args: Namespace) -> int:
    from leanlm.data.sources import DataContext, DataMix
    from leanlm.models import load_tokenizer

    if args.seq_len < 2:
        raise LeanLMError(f"--seq-len must be at least 2, got {args.seq_len}")
    mix = DataMix.parse(args.data)
    tokenizer = load_tokenizer(args.model)
    windows = mix.training(DataContext(tokenizer, args.model, device=args.device), args.seq_len)  # (n, seq_len)
    print(json.dumps({"model": args.model, "data": mix.describe()}, indent=2))
    for row in windows[: args.show]:
        print("-" * 72 + "\n" + tokenizer.decode(row))
    print(f"{len(windows)} windows of {args.seq_len} tokens from {mix.label()}")
    return 0
