"""Command-line parts of data and evaluation texts (torch-free: `--help` stays fast).

- ``--data SPEC`` for analyze / prune / distill (``add_data_arg``), checked while parsing;
- ``leanlm data``: prepare and inspect a data setting (generates and caches teacher text), print its record.

SPEC: see ``leanlm.data_syntax`` (printed by `leanlm data --help`).
"""

from __future__ import annotations

import argparse
import json
from argparse import Namespace

from leanlm.data_syntax import HINT, SPEC_HELP
from leanlm.errors import LeanLMError

DATA_HELP = f"calibration / training text: {HINT}; see `leanlm data --help` (default: wikitext = WikiText-2 validation)"


def data_spec(text: str):
    """argparse type: a parsed, checked ``DataMix`` (a bad spec is one line, exit 2)."""
    from leanlm.data.sources import DataMix

    try:
        return DataMix.parse(text)
    except LeanLMError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_data_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=data_spec, default=None, metavar="SPEC", help=DATA_HELP)


def add_text_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default=None, metavar="FILE",
                        help="score this text instead of WikiText (same protocols): a UTF-8 file, or a built-in "
                             "out-of-domain novel: botchan, pride (Pride and Prejudice); recorded with its sha256")


def add_parser(sub, add_device_arg) -> argparse.ArgumentParser:
    """`leanlm data`; ``add_device_arg`` is the CLI's own --device option (passed in: no import cycle)."""
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
