"""argparse value types shared by the sub-commands (torch-free: parsing must stay fast)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def tokens_or_all(text: str) -> int | None:
    if text == "all":
        return None
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("expected at least 2 tokens, or 'all'")
    return value


def int_list(text: str) -> tuple[int, ...]:
    return tuple(positive_int(part) for part in text.split(",") if part)
