"""Checks of the parsed CLI arguments that need no model and no torch: they run first, in a fraction of a second.

Each mistake is one `LeanLMError` sentence in CLI wording (`--resume`, not `resume=True`). What needs
a model's config or a policy's settings is checked later, still before any weights are loaded.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

from leanlm.errors import LeanLMError

KV_BUDGET_DEFAULT = 0.25
KV_CONTEXT_DEFAULT = 2048

EXAMPLES: dict[str, list[str]] = {
    "eval": [
        "leanlm eval                                      # bundled smollm2-135m, WikiText-2 test, 16k tokens",
        "leanlm eval --model runs/pruned/model --max-tokens all --out runs/eval-pruned",
        "leanlm eval --kv-cache heavy_hitter+int4 --kv-budget 0.125 --no-speed",
        "leanlm eval --text pride --no-speed               # Pride and Prejudice (out of domain), same protocol",
    ],
    "generate": [
        'leanlm generate "The capital of France is" --max-new-tokens 20',
        'echo "Once upon a time" | leanlm generate --temperature 0.8 --seed 1',
        'leanlm generate "Hello" --kv-cache sink_window --kv-budget 0.1 --kv-positions cache',
    ],
    "analyze": [
        "leanlm analyze --out runs/heads                  # kl, magnitude and taylor scores + heatmaps",
        "leanlm analyze --scorers magnitude --out runs/heads-magnitude",
    ],
    "run": [
        "leanlm run recipes/smollm2-heads-25.yaml --out runs/heads25",
        "leanlm run recipes/smollm2-heads-25.yaml --out runs/heads25 --resume   # after Ctrl-C",
    ],
    "prune": [
        "leanlm prune --fraction 0.2 --out runs/pruned    # saved in the source dtype (bf16 for smollm2-135m)",
        "leanlm prune --fraction 0.33 --layout uniform --granularity kv_group --scorer magnitude --out runs/kv-pruned",
    ],
    "distill": [
        "leanlm distill --student runs/pruned/model --out runs/recovered --steps 200 --checkpoint-every 20",
        "leanlm distill --student runs/pruned/model --out runs/recovered --steps 200 --resume   # after Ctrl-C",
        "leanlm distill --student runs/pruned/model --out runs/recovered --steps 400 --resume   # extend a finished run",
    ],
    "export": [
        "leanlm export --model runs/recovered/model --out runs/release",
        "leanlm export --model runs/recovered/model --out runs/release-fp32 --dtype float32",
    ],
    "probe": [
        "leanlm probe --student runs/prune25/model --out runs/probe   # vs the bundled smollm2-135m",
        "leanlm probe --student pruned=runs/p/stages/t1-prune_heads/model recovered=runs/p/model --texts wikitext-test,botchan",
    ],
    "data": [
        "leanlm data --data teacher                       # sample teacher text from smollm2-135m once (cached)",
        "leanlm data --data teacher@0.5,wikitext@0.5 --show 1",
        "leanlm distill --student runs/pruned/model --out runs/rec-teacher --data teacher:tokens=80000",
    ],
    "serve": [
        "leanlm serve --port 8000                                  # bundled smollm2-135m, bf16, batch up to 8",
        "leanlm serve --model runs/pruned/model --max-batch 8 --max-queue 64",
        "leanlm serve --kv-cache quantized --kv-budget 0.25       # compressed cache (sequences run at batch 1)",
    ],
    "kv-budget": [
        "leanlm kv-budget --seq-len 8192",
        "leanlm kv-budget --layers 32 --heads 32 --kv-heads 8 --head-dim 128 --json",
    ],
}


def check_args(args: Namespace) -> None:
    """Refuse plain mistakes in ``args`` (and fill the --kv-* defaults) before anything heavy happens."""
    if hasattr(args, "kv_cache"):
        _check_kv_args(args)
    checks = {"prune": _check_prune, "distill": _check_distill, "run": _check_run, "kv-budget": _check_kv_shape}
    if args.command in checks:
        checks[args.command](args)
    from leanlm.sources import check_source

    for flag in ("model", "student", "teacher"):
        if getattr(args, flag, None) is not None:
            check_source(getattr(args, flag))  # unknown model, or a hub id while offline
    if args.command in ("eval", "analyze", "prune", "export") and getattr(args, "out", None) is not None:
        from leanlm.report.results import check_new_output

        check_new_output(args.out)


def _check_kv_args(args: Namespace) -> None:
    if args.kv_cache is None:
        given = [flag for flag, value in (("--kv-budget", args.kv_budget), ("--kv-context", args.kv_context)) if value is not None]
        if given:
            raise LeanLMError(f"{' and '.join(given)} only apply to a KV-cache policy: add --kv-cache POLICY "
                              f"(e.g. --kv-cache sink_window), or drop {' and '.join(given)}")
        return
    args.kv_budget = KV_BUDGET_DEFAULT if args.kv_budget is None else args.kv_budget
    args.kv_context = KV_CONTEXT_DEFAULT if args.kv_context is None else args.kv_context
    if not 0 < args.kv_budget <= 1:
        raise LeanLMError(f"--kv-budget must be in (0, 1] (a fraction of the full cache bytes), got {args.kv_budget}")


def _check_prune(args: Namespace) -> None:
    if args.fraction is not None and not 0 <= args.fraction < 1:
        raise LeanLMError(f"--fraction must be in [0, 1), got {args.fraction}")


def distill_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under ``out`` (the layout of ``leanlm.recover.checkpoint``), oldest first."""
    found = [p.parent for p in Path(out).glob("checkpoint/step-*/state.json")]
    return sorted(found, key=lambda p: p.name)


def _check_distill(args: Namespace) -> None:
    if args.checkpoint_every < 0:
        raise LeanLMError(f"--checkpoint-every must be 0 (only at the end and on a signal) or more, got {args.checkpoint_every}")
    out = Path(args.out)
    if args.resume:
        if not distill_checkpoints(out):
            raise LeanLMError(f"--resume: '{out}' holds no distill checkpoint, so there is nothing to resume; "
                              "drop --resume to start a new run there")
        return
    if distill_checkpoints(out):
        raise LeanLMError(f"'{out}' holds a distill checkpoint: pass --resume to continue that run, or pick a new --out")
    from leanlm.report.results import check_new_output

    check_new_output(out)  # distill never writes into a used folder


def _check_run(args: Namespace) -> None:
    if not args.resume:
        if args.out is not None:
            from leanlm.report.results import check_new_output

            check_new_output(args.out)
        return
    if args.out is None:
        raise LeanLMError("--resume needs --out: the run directory to continue")
    if not Path(args.out).is_dir() or not any(Path(args.out).iterdir()):
        raise LeanLMError(f"--resume: '{args.out}' holds no run, so there is nothing to resume; "
                          "drop --resume to start a new run there")


def _check_kv_shape(args: Namespace) -> None:
    if args.heads and args.kv_heads and args.heads % args.kv_heads:
        raise LeanLMError(f"query heads ({args.heads}) must be a multiple of KV heads ({args.kv_heads})")
