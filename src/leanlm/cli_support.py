"""What the CLI tells the user before the work starts: what a --fraction really removes, whether a text fits
the model's context, and how big the files it wrote are.

Kept out of `commands.py` so each sub-command stays a short list of steps.
"""

from __future__ import annotations

import logging
import shlex
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from leanlm.errors import LeanLMError

log = logging.getLogger("leanlm")


@dataclass(frozen=True)
class PrunePlan:
    """What `select_heads` will remove for a fraction, from the head counts alone (before any scoring)."""

    requested: float
    removed: int  # query heads over the whole model
    total: int
    nearest: tuple[float, ...]  # achievable fractions around the request
    detail: str  # e.g. "3 of 9 query heads per layer"

    @property
    def fraction(self) -> float:
        return self.removed / self.total

    def sentence(self, layout: str, granularity: str) -> str:
        near = ", ".join(f"{f:.3g}" for f in self.nearest)
        return (f"--fraction {self.requested:g} ({layout}, {granularity}) removes {self.detail} = {self.fraction:.1%} "
                f"of the query heads, the nearest the head groups allow; nearest fractions: {near}")


def _steps(heads: int, kv_heads: int, granularity: str) -> tuple[int, int]:
    """(heads per removal step, number of steps) of one layer, as `layer_steps` builds them."""
    group = heads // kv_heads
    if granularity == "kv_group" or group == 1:
        return group, kv_heads  # whole KV groups
    return kv_heads, group  # one query head from every group per step


def _closest(step: int, steps: int, target: float) -> int:
    """The step count closest to ``target`` heads, ties to fewer (the rule of `select_heads`)."""
    return min(range(steps + 1), key=lambda i: (abs(i * step - target), i))


def prune_plan(config, fraction: float, layout: str, granularity: str) -> PrunePlan | None:
    """The plan for a model config with the same heads in every layer (None for per-layer shapes)."""
    per_layer = getattr(config, "leanlm_heads_per_layer", None)
    if per_layer and len(set(per_layer)) > 1:
        return None  # already pruned per layer: the count depends on the scores
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    step, steps = _steps(heads, kv_heads, granularity)
    total = heads * layers
    if layout == "uniform":
        k = _closest(step, steps, fraction * heads)
        nearest = tuple(i * step / heads for i in range(max(0, k - 1), min(steps - 1, k + 1) + 1))
        return PrunePlan(fraction, k * step * layers, total, nearest, f"{k * step} of {heads} query heads per layer")
    # global: steps of `step` heads taken while they bring the count closer to the target; a
    # layer's last step is never taken (it would empty the layer).
    k = _closest(step, (steps - 1) * layers, fraction * total)
    nearest = tuple(i * step / total for i in range(max(0, k - 1), min((steps - 1) * layers, k + 1) + 1))
    return PrunePlan(fraction, k * step, total, nearest, f"{k * step} of {total} query heads (steps of {step})")


def announce_prune_plan(config, fraction: float, layout: str, granularity: str) -> PrunePlan | None:
    """Say what the fraction becomes before the work; refuse a fraction that removes nothing."""
    plan = prune_plan(config, fraction, layout, granularity)
    if plan is None:
        log.info("--fraction %g: per-layer head counts; the exact share removed depends on the scores", fraction)
        return None
    if plan.removed == 0 and fraction > 0:
        raise LeanLMError(f"{plan.sentence(layout, granularity)}, so nothing would be pruned; pick one of those fractions")
    if abs(plan.fraction - fraction) > 0.005:
        log.warning("leanlm: %s", plan.sentence(layout, granularity))
    else:
        log.info("%s", plan.sentence(layout, granularity))
    return plan


def model_context(config) -> int | None:
    """Tokens the model was trained to attend over (`max_position_embeddings`), or None if unknown."""
    return getattr(config, "max_position_embeddings", None)


def check_window(tokens: int, config, flag: str) -> None:
    """Refuse a window longer than the model's context."""
    context = model_context(config)
    if context is not None and tokens > context:
        raise LeanLMError(f"{flag} {tokens} is longer than the model's context of {context:,} tokens "
                          f"(max_position_embeddings); use {flag} {context} or less")


def fit_prompt(ids: list[int], max_new_tokens: int, config, truncate: bool) -> list[int]:
    """The prompt's token ids, refused (or, with --truncate, cut to its last tokens) if the reply would not fit."""
    context = model_context(config)
    if context is None or len(ids) + max_new_tokens <= context:
        return ids
    room = context - max_new_tokens
    if room < 1:
        raise LeanLMError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                          f"of {context:,} tokens; ask for fewer new tokens")
    if truncate:
        log.warning("leanlm: prompt cut to its last %d of %d tokens to fit the model's context of %d", room, len(ids), context)
        return ids[-room:]
    raise LeanLMError(f"the prompt is {len(ids):,} tokens and --max-new-tokens {max_new_tokens} would reach "
                      f"{len(ids) + max_new_tokens:,}, past the model's context of {context:,} tokens; shorten the "
                      f"prompt, ask for fewer tokens, or pass --truncate to keep its last {room:,} tokens")


def weight_bytes(path: str | Path) -> int:
    """Bytes of the weight files in a model directory (or of a .gguf file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) + sum(p.stat().st_size for p in path.glob("*.bin"))


def source_weight_bytes(source: str) -> int | None:
    """Bytes of the weights a model argument points at (None for a hub id)."""
    from leanlm.models.loading import resolve_source

    where, gguf = resolve_source(source)
    path = Path(where) / gguf if gguf else Path(where)
    return weight_bytes(path) if path.exists() else None


def size_line(label: str, saved: int, source: int | None, dtype: str) -> str:
    mib = 2**20
    text = f"{label}: weights {saved / mib:,.1f} MiB ({saved:,} bytes, {dtype})"
    if source:
        text += f" vs {source / mib:,.1f} MiB ({source:,} bytes) for the source: x{saved / source:.3f}"
    return text


DISTILL_FLAGS = {"steps": "--steps", "alpha": "--alpha", "temperature": "--temperature", "top_k_teacher": "--top-k-teacher",
                 "seq_len": "--seq-len", "batch_size": "--batch-size"}


def check_distill_resume(out: Path, args) -> None:
    """Refuse, in CLI words, a --resume whose settings differ from the run's, or a run with nothing left to do."""
    import json

    from leanlm.cli_checks import distill_checkpoints

    latest = distill_checkpoints(out)[-1]
    state = json.loads((latest / "state.json").read_text(encoding="utf-8"))
    saved, done = state["config"], state["step"]
    for field, flag in DISTILL_FLAGS.items():
        if field != "steps" and saved.get(field) != getattr(args, field):
            raise LeanLMError(f"--resume: the run in '{out}' was started with {flag} {saved.get(field)}; resume with "
                              f"the same {flag} (it shapes every step), or start a new run with a new --out")
    planned, finished = saved["steps"], (Path(out) / "model").exists()
    args.steps = args.steps or planned
    if args.steps == planned and finished:
        raise LeanLMError(f"--resume: the run in '{out}' already finished all {planned} steps (model in '{out}/model'); "
                          f"nothing is left to resume")
    if args.steps != planned:
        tail = "ended" if finished else "ends"
        raise LeanLMError(
            f"--resume --steps {args.steps}: the run in '{out}' was planned for {planned} steps and its cosine "
            f"learning-rate schedule {tail} at 0 at step {planned}, so it cannot be stretched without changing the "
            f"{done} steps already taken; resume with --steps {planned}"
            + (f", or train on from its merged model: leanlm distill --student {out}/model --out NEW_DIR" if finished else "")
        )


# ---------------------------------------------------------------- shared by the sub-commands


def command_line() -> str:
    return "leanlm " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def out_dir(args: Namespace, kind: str) -> Path:
    from leanlm.outputs import default_out
    from leanlm.report import check_new_output

    from leanlm.models.loading import resolve_source

    resolve_source(args.model)  # an unknown model is reported before anything else happens
    out = args.out or default_out(kind, args.model)
    check_new_output(out)  # refuse before spending minutes on the model
    return out


def check_context(model: str, tokens: int, flag: str) -> None:
    from leanlm.models import load_config

    check_window(tokens, load_config(model), flag)


def data_source(split: str) -> dict:
    from leanlm.data.wikitext import split_source

    return split_source(split)
