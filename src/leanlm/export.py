"""Reloadable checkpoints: a save_pretrained directory + tokenizer + a model card with the numbers.

- Layers that agree (uniform pruning, layer pruning, no pruning) -> a stock Llama config: plain
  ``AutoModelForCausalLM.from_pretrained`` loads it, no leanlm needed (vLLM too).
- Per-layer shapes (global pruning) -> the compact form (``leanlm.models.compact``: a
  documented config extension that ``leanlm.models.load_model`` reads back), really smaller and
  faster; plus, on request, a padded copy beside it with zero heads re-inserted so stock
  ``from_pretrained`` loads it (same logits, original size).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from leanlm.models import ModelSpec
from leanlm.report import atomic_write_text, ordinary_modes
from leanlm.transforms import is_compact, pad_heads, save_compact, sync_shape_config


@dataclass
class ExportResult:
    path: str
    stock_loadable: bool  # plain transformers can load `path`
    padded_path: str | None  # stock-loadable padded copy (only for per-layer layouts)

    def to_dict(self) -> dict:
        return vars(self).copy()


def stock_layout(model) -> bool:
    """Whether stock transformers can load this model's shapes (else the compact form is written)."""
    sync_shape_config(model)
    return not is_compact(model.config)


def size_metrics(model) -> list[tuple[str, str]]:
    """Rows for the card's "Measured" table: parameters and weight bytes as held (dtype included)."""
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    held = sum(p.numel() * p.element_size() for p in params)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    return [("parameters", f"{count:,}"), ("weights", f"{held / 2**20:,.1f} MiB ({held:,} bytes, {', '.join(dtypes)})")]


def previous_steps(source: str) -> list[str]:
    """The "What was done" steps of the source model's card (README.md), so an export keeps the history."""
    from leanlm.models.loading import resolve_source

    where, gguf = resolve_source(source)
    readme = Path(where) / "README.md"
    if gguf or not readme.is_file():
        return []
    steps, inside = [], False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## What was done"
        elif inside and re.match(r"^\d+\. ", line):
            steps.append(line.split(". ", 1)[1])
    return steps


def model_card(title: str, steps: list[str], metrics: list[tuple[str, str]], spec: ModelSpec, stock: bool) -> str:
    """A README.md for the checkpoint: what was done, the measured numbers, how to load it."""
    load = (
        "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(PATH)"
        if stock
        else "from leanlm.models import load_model  # per-layer head counts: the leanlm compact format\nmodel = load_model(PATH)"
    )
    heads = ", ".join(map(str, spec.heads_per_layer))
    kv_heads = ", ".join(map(str, spec.kv_heads_per_layer))
    lines = [
        "---", "library_name: transformers", "tags: [leanlm, pruned]", "---", "", f"# {title}", "",
        "## What was done", "", *[f"{i}. {step}" for i, step in enumerate(steps, 1)], "",
        *(["## Measured", "", "| metric | value |", "| --- | ---: |", *[f"| {k} | {v} |" for k, v in metrics], ""]
          if metrics else []),
        "## Shape", "", f"{spec.num_layers} layers; query heads per layer: {heads}; KV heads per layer: {kv_heads}; "
        f"head_dim {spec.head_dim}.", "", "## Load", "", "```python", load, "```", "",
    ]
    return "\n".join(lines)


def export_model(model, tokenizer, out: str | Path, card: str, padded: bool = True) -> ExportResult:
    """Write `out` (and `out`-padded for per-layer layouts when `padded`); each folder appears whole or not at all."""
    out = Path(out)
    _write_dir(out, lambda tmp: (save_compact(model, tokenizer, tmp), atomic_write_text(tmp / "README.md", card)))
    stock = not is_compact(model.config)
    padded_path = None
    if not stock and padded:
        padded_path = out.with_name(out.name + "-padded")
        copy = pad_heads(model)
        note = card + "\nThis is the *padded* copy: removed heads re-inserted as zeros so stock transformers loads it.\n"
        _write_dir(padded_path, lambda tmp: (save_compact(copy, tokenizer, tmp), atomic_write_text(tmp / "README.md", note)))
        if is_compact(copy.config):  # e.g. MLP widths still differ per layer: no stock form exists
            shutil.rmtree(padded_path)
            padded_path = None
    return ExportResult(str(out), stock, str(padded_path) if padded_path else None)


def _write_dir(target: Path, write) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        ordinary_modes(tmp)  # mkdtemp and safetensors' temp files are private; outputs are ordinary files
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
