"""The `leanlm` command line: eval, analyze, kv-budget.

User mistakes print one sentence on stderr and exit 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from leanlm import __version__, cli_data
from leanlm.cli_types import int_list, positive_int, tokens_or_all  # noqa: F401  (argparse types, also used by sub-command modules)
from leanlm.errors import Interrupted, LeanLMError
from leanlm.outputs import default_out  # noqa: F401  (its old home; commands import it from leanlm.outputs)

log = logging.getLogger("leanlm")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one sentence and exit 2 (argparse's code), no usage dump."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


SAVED_DTYPE_HELP = ("dtype of the saved weights (default: the source model's dtype from its config; bfloat16 for "
                    "the bundled model or a .gguf), so the output is never wider than its source")


def add_model_args(parser: argparse.ArgumentParser, dtype_default: str = "bfloat16", saved: bool = False) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="bundled name (smollm2-135m; qwen2.5-0.5b, gemma3-270m after `make models`), "
                             "a save_pretrained directory, a .gguf file or a hub id (default: %(default)s)")
    if saved:
        parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"], help=SAVED_DTYPE_HELP)
        return
    parser.add_argument("--dtype", default=dtype_default, choices=["bfloat16", "float32", "float16"],
                        help="dtype the model runs in; bfloat16 is ~4x faster than float32 on CPUs with AVX-512 BF16; "
                             "elsewhere evaluation and training widen its many-row products to float32 (about "
                             "float32's speed); it agrees within 1%% on perplexity (default: %(default)s)")
    add_device_arg(parser)


DEVICE_CHOICES = ("auto", "cpu", "cuda")  # leanlm.models.device.DEVICES (not imported here: --help stays fast)


def add_device_arg(parser: argparse.ArgumentParser, default: str | None = "auto") -> None:
    parser.add_argument("--device", default=default, choices=DEVICE_CHOICES,
                        help="where the model runs: auto (CUDA when torch sees a GPU, else the CPU), cpu or cuda "
                             "(an error without CUDA)" + (" (default: %(default)s)" if default else
                                                          " (default: the recipe's device:)"))


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib-samples", type=positive_int, default=8,
                        help="calibration windows drawn from --data (default: %(default)s)")
    parser.add_argument("--calib-len", type=positive_int, default=128,
                        help="tokens per calibration window (default: %(default)s)")
    cli_data.add_data_arg(parser)


def add_kv_cache_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache", default=None, metavar="POLICY",
                        help="run-time KV-cache policy: quantized, sink_window, heavy_hitter, observation_window, "
                             "sentence_tier, or an eviction policy with quantized storage, e.g. heavy_hitter+int4; "
                             "settings after a colon, e.g. sentence_tier:max_sentence=32,coarse=mean (default: full cache)")
    parser.add_argument("--kv-budget", type=float, default=None,
                        help="with --kv-cache: fraction of the full bf16 cache bytes of --kv-context tokens the policy "
                             "may hold (default: 0.25)")
    parser.add_argument("--kv-context", type=positive_int, default=None,
                        help="with --kv-cache: tokens whose full cache the budget refers to (default: 2048)")
    parser.add_argument("--kv-positions", default="original", choices=["original", "cache"],
                        help="sink_window only: rotary positions from the text (original) or from the cache slot "
                             "(cache: StreamingLLM's way, lets generation run past the trained length)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="leanlm", description="Make a pretrained LLM cheaper to run, with honest numbers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    parser.add_argument("--version", action="version", version=f"leanlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    ev = sub.add_parser("eval", help="evaluate a model: perplexity, KV bytes, weights, speed, memory",
                        description="Evaluate a model on WikiText-2 and write DIR/results.json, DIR/report.md and plots.")
    add_model_args(ev)
    ev.add_argument("--out", type=Path, help="new results directory (never overwritten; default runs/eval-MODEL-TIME)")
    ev.add_argument("--split", default="test", choices=["test", "validation", "botchan"],
                    help="WikiText-2 split to score, or botchan: an out-of-domain English novel fetched once from "
                         "the sentencepiece sdist on PyPI (default: %(default)s)")
    ev.add_argument("--protocol", default="sliding", choices=["sliding", "nonoverlap"],
                    help="sliding: raw file, overlapping windows, each token scored once with up to window-stride "
                         "tokens of context; nonoverlap: rows joined with blank lines, back-to-back windows (the "
                         "GPTQ / LLM-Pruner convention) (default: %(default)s)")
    ev.add_argument("--window", type=positive_int, default=None,
                    help="tokens per window (default: 1024 for sliding, 2048 for nonoverlap)")
    ev.add_argument("--stride", type=positive_int, default=None, help="sliding only: window step (default: window/2)")
    ev.add_argument("--max-tokens", type=tokens_or_all, default=16384,
                    help="score the first N tokens of the split, or 'all' for the whole split (default: %(default)s)")
    ev.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    ev.add_argument("--speed-repeats", type=positive_int, default=3,
                    help="timed runs per speed number (median) (default: %(default)s)")
    ev.add_argument("--prefill-lengths", type=int_list, default=(512, 2048), help="comma list (default: 512,2048)")
    ev.add_argument("--decode-batches", type=int_list, default=(1, 4), help="comma list (default: 1,4)")
    ev.add_argument("--decode-tokens", type=positive_int, default=32, help="new tokens per decode run (default: 32)")

    cli_data.add_text_arg(ev)
    add_kv_cache_args(ev)
    ev.add_argument("--kv-chunk", type=positive_int, default=32,
                    help="with --kv-cache: tokens per forward as the text streams through the cache (default: %(default)s)")

    gen = sub.add_parser("generate", help="generate text, streamed to the terminal, optionally through a KV-cache policy",
                         description="Generate text token by token (greedy by default), optionally through a "
                                     "run-time KV-cache policy; with --kv-cache, logs the cache bytes held at the end.")
    add_model_args(gen)
    gen.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read stdin)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); else sample top-k/top-p")
    gen.add_argument("--top-k", type=positive_int, default=50, help="sampling: keep the k likeliest (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sampling: keep the likeliest with this total probability")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    gen.add_argument("--weights", default="native", metavar="FORMAT",
                     help="native (the --dtype weights, default), int8 or int4 weight-only quantization "
                          "(int4: the output head at int8)")
    gen.add_argument("--weight-group", type=positive_int, default=32, help="int4: weights per scale and zero (default: 32)")
    gen.add_argument("--draft", default=None, metavar="MODEL",
                     help="speculative decoding: a smaller model with the same tokenizer proposes tokens, or "
                          "'ngram': the text's own earlier continuations do (prompt lookup, no model)")
    gen.add_argument("--draft-tokens", type=int, default=4, help="speculative: tokens the draft proposes per round")
    gen.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                     help="torch.compile the decode step (static cache; compiling takes minutes on a small CPU)")
    gen.add_argument("--truncate", action="store_true",
                     help="keep the prompt's last tokens when prompt + new tokens exceed the model's context "
                          "(default: refuse such a prompt)")
    add_kv_cache_args(gen)

    an = sub.add_parser("analyze", help="score attention heads (KL utility, magnitude, Taylor) on calibration text",
                        description="Score every attention head and KV group on calibration text (--data; WikiText-2 "
                                    "validation by default); write JSON "
                                    "scores and layer x head heatmaps.")
    add_model_args(an)
    an.add_argument("--out", type=Path, help="new results directory (default runs/analyze-MODEL-TIME)")
    an.add_argument("--scorers", default="kl,magnitude,taylor",
                    help="comma list of kl, magnitude, taylor (default: %(default)s)")
    add_calibration_args(an)
    an.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows")

    rn = sub.add_parser("run", help="run a recipe end to end: eval, score, prune, eval, LoRA+KD, eval, export, report",
                        description="Run a YAML recipe (see recipes/). Writes DIR/results.json, report.md, plots/, "
                                    "model/; an interrupted run continues with --resume.")
    rn.add_argument("recipe", type=Path, help="YAML recipe file")
    rn.add_argument("--out", type=Path, help="run directory (default runs/NAME-TIME)")
    rn.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    add_device_arg(rn, default=None)
    rn.add_argument("--with-reference", action="store_true",
                    help="also give the unpruned model the same LoRA + CE budget on the same data (domain-adaptation reference)")

    pr = sub.add_parser("prune", help="remove attention heads, whole layers or MLP channels physically; writes a loadable model",
                        description="Score the model on calibration text (--data, default WikiText-2 validation) and "
                                    "physically remove attention heads "
                                    "(--what heads), decoder blocks (layers) or MLP channels (mlp). Options a technique "
                                    "does not take are refused; the others default to the transform's own defaults.")
    add_model_args(pr, saved=True)
    add_device_arg(pr)
    pr.add_argument("--out", type=Path, required=True, help="new directory; the model goes to DIR/model")
    pr.add_argument("--what", default="heads", help="heads | layers | mlp (default: %(default)s)")
    pr.add_argument("--fraction", type=float, help="heads, mlp: share to remove, in [0, 1) (default: 0.25)")
    pr.add_argument("--layout", help="heads, mlp: uniform (same share per layer) | global (ranked across layers) "
                                     "(default: global for heads, uniform for mlp)")
    pr.add_argument("--granularity", help="heads: query (heads inside each KV group) | kv_group (whole groups, "
                                          "shrinks the KV cache) (default: query)")
    pr.add_argument("--scorer", help="heads: kl | magnitude | taylor (default: kl)")
    pr.add_argument("--num-layers", type=int, help="layers: how many blocks to remove, lowest Block Influence first (default: 1)")
    pr.add_argument("--layers", type=lambda text: [int(x) for x in text.split(",") if x], help="layers: explicit comma "
                                                                                                "list of block indices")
    add_calibration_args(pr)

    di = sub.add_parser("distill", help="recover a pruned model: LoRA + knowledge distillation from the original",
                        description="Train LoRA adapters on the student to match the teacher (KL at temperature T mixed "
                                    "with CE) on --data (default WikiText-2 validation), merge them, and save DIR/model.")
    di.add_argument("--student", required=True, help="model directory to recover (e.g. from leanlm prune)")
    di.add_argument("--teacher", default="smollm2-135m", help="the original model (default: %(default)s)")
    di.add_argument("--out", type=Path, required=True, help="directory for checkpoints and the merged model")
    di.add_argument("--steps", type=positive_int, default=None,
                    help="optimizer steps (default: 200; with --resume, the run's own)")
    di.add_argument("--max-minutes", type=float, default=None,
                    help="stop after the step that crosses this budget (default: no limit)")
    di.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA rank (default: %(default)s)")
    di.add_argument("--lora-mlp", action="store_true", help="also put LoRA on the MLP projections")
    di.add_argument("--alpha", type=float, default=0.5, help="KD weight; 1-alpha weighs CE (default: %(default)s)")
    di.add_argument("--temperature", type=float, default=2.0, help="KD temperature (default: %(default)s)")
    di.add_argument("--top-k-teacher", type=int, default=0,
                    help="cache the teacher's top-k logits once (0 = live teacher) (default: %(default)s)")
    di.add_argument("--resume", action="store_true",
                    help="continue from the latest checkpoint in --out (a larger --steps extends a finished run)")
    di.add_argument("--seq-len", type=positive_int, default=256, help="tokens per training window (default: %(default)s)")
    di.add_argument("--batch-size", type=positive_int, default=4, help="windows per step (default: %(default)s)")
    di.add_argument("--checkpoint-every", type=int, default=50,
                    help="save a checkpoint every N steps, at the end and on Ctrl-C/SIGTERM; 0 = only then "
                         "(default: %(default)s)")
    di.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"], help=SAVED_DTYPE_HELP)
    cli_data.add_data_arg(di)
    add_device_arg(di)

    ex = sub.add_parser("export", help="write a reloadable checkpoint (stock transformers where possible) with a model card",
                        description="Export a model directory: stock save_pretrained when every layer has the same "
                                    "shape, else the compact form plus a padded stock-loadable copy.")
    ex.add_argument("--model", required=True, help="model to export (directory, bundled name, .gguf)")
    ex.add_argument("--out", type=Path, required=True, help="new directory")
    ex.add_argument("--no-padded", action="store_true", help="do not write the padded stock copy of a per-layer model")
    ex.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"], help=SAVED_DTYPE_HELP)
    add_device_arg(ex)

    from leanlm.serve.command import add_parser as add_serve_parser

    serve = add_serve_parser(sub)
    add_model_args(serve)
    add_kv_cache_args(serve)
    kv = sub.add_parser("kv-budget", help="KV-cache bytes per token and per sequence: MHA, GQA, MQA, MLA, quantized",
                        description="Tabulate KV-cache sizes for a model's shape (or one you give) under each layout.")
    kv.add_argument("--model", default="smollm2-135m", help="model whose shape to use (only its config is read)")
    kv.add_argument("--layers", type=positive_int, help="override: decoder layers")
    kv.add_argument("--heads", type=positive_int, help="override: query heads per layer")
    kv.add_argument("--kv-heads", type=positive_int, help="override: KV heads per layer")
    kv.add_argument("--head-dim", type=positive_int, help="override: head dimension")
    kv.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence (default: %(default)s)")
    kv.add_argument("--batch", type=positive_int, default=1, help="sequences (default: %(default)s)")
    kv.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per cached value (default: 2, bf16)")
    kv.add_argument("--latent-dim", type=positive_int, help="MLA latent width per layer (default: kv_heads x head_dim)")
    kv.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    cli_data.add_parser(sub, add_device_arg)
    from leanlm.probe_command import add_parser as add_probe_parser

    add_device_arg(add_probe_parser(sub))
    from leanlm import plan_command

    plan_command.add_parser(sub, add_model_args, positive_int)
    add_examples(parser, sub)
    return parser


def add_examples(parser: argparse.ArgumentParser, sub) -> None:
    """Examples at the end of every `--help` (argparse epilog), kept as written."""
    from leanlm.cli_checks import EXAMPLES

    parser.epilog = "examples:\n" + "\n".join(f"  leanlm {name} --help" for name in sub.choices)
    for name, command in [("leanlm", parser), *sub.choices.items()]:
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        if name in EXAMPLES:
            command.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a bad option already reported in one line
        return int(done.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        from leanlm.cli_checks import check_args

        check_args(args)  # plain mistakes fail here, in a fraction of a second, before torch is imported
    except LeanLMError as err:
        print(f"leanlm: error: {err}", file=sys.stderr)
        return 2
    _quiet_libraries()
    try:
        if getattr(args, "device", None) is not None:
            from leanlm.models import resolve_device

            resolve_device(args.device)  # `--device cuda` without CUDA fails before any work
        from leanlm import commands
        from leanlm import plan_command

        handlers = {"eval": commands.run_eval, "analyze": commands.run_analyze, "kv-budget": commands.run_kv_budget,
                    "run": commands.run_run, "prune": commands.run_prune, "distill": commands.run_distill,
                    "export": commands.run_export,
                    "generate": commands.run_generate, "data": cli_data.run, "probe": _run_probe,
                    "plan": plan_command.run}
        if args.command == "serve":
            from leanlm.serve.command import run as run_serve

            return run_serve(args)
        return handlers[args.command](args)
    except LeanLMError as err:
        print(f"leanlm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leanlm: interrupted; no results were written", file=sys.stderr)
        return 130
    except Interrupted as stop:  # a signal after which work was saved (distill's checkpoint)
        print(f"leanlm: {stop}", file=sys.stderr)
        return 130


def _run_probe(args) -> int:
    from leanlm.probe_command import run

    return run(args)


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
