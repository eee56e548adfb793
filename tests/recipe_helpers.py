"""Shared by the recipe tests: the head every tiny-model recipe starts with (float32 on the CPU, a
300-token evaluation, 2 calibration windows), so a test writes only what it is about."""

from __future__ import annotations


def tiny_recipe(name: str, model, body: str) -> str:
    """A recipe named ``name`` on ``model`` (a directory, or any name for parse-only tests) + ``body`` (YAML)."""
    head = f"""name: {name}
model: {model}
dtype: float32
device: cpu
eval: {{method: nonoverlap, window: 128, max_tokens: 300, speed: false, ood: false}}
calibration: {{samples: 2, seq_len: 32}}
"""
    return head + body.lstrip("\n")
