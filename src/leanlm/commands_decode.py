"""The decoding sub-commands: `leanlm generate` (the engine, a KV policy, or speculative) and `leanlm eval --kv-cache`."""

from __future__ import annotations

import logging
import sys
from argparse import Namespace

from leanlm.cli_support import check_context as _check_context
from leanlm.cli_support import command_line as _command_line
from leanlm.cli_support import data_source as _data_source
from leanlm.cli_support import out_dir as _out_dir
from leanlm.errors import LeanLMError

log = logging.getLogger("leanlm")


def policy_from_args(args: Namespace, tokenizer=None, model=None):
    """The KV-cache policy the --kv-* options name, or None for the full cache.

    ``model`` (a model or its config) gives the head_dim sizing needs; by default its config is read.
    """
    from leanlm.kvcache import make_policy
    from leanlm.models import load_config

    if args.kv_cache is None:
        if args.kv_positions != "original":
            raise LeanLMError("--kv-positions needs --kv-cache sink_window")
        return None
    settings = {"position_mode": args.kv_positions} if args.kv_positions != "original" else {}
    if settings and not args.kv_cache.startswith("sink_window"):
        raise LeanLMError("--kv-positions cache applies to sink_window only")
    model = model if model is not None else load_config(args.model)
    return make_policy(args.kv_cache, args.kv_budget, args.kv_context, tokenizer, model, **settings)


def run_generate(args: Namespace) -> int:
    """`leanlm generate`: the decode engine (static cache, a KV policy, or speculative with --draft)."""
    from contextlib import nullcontext

    import torch

    from leanlm.engine import SamplingConfig, static_cache, stream
    from leanlm.engine.weights import apply_weight_format, check_weight_format
    from leanlm.kvcache import attach
    from leanlm.models import load_model, load_tokenizer

    policy_from_args(args)  # bad policy and weight settings fail before the model loads
    check_weight_format(args.weights)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
    sampling.validate()
    if args.draft is not None and (args.kv_cache is not None or args.draft_tokens < 1):
        raise LeanLMError("--draft needs --draft-tokens >= 1 and the full cache (no --kv-cache)")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise LeanLMError("empty prompt: pass it as an argument or on stdin")
    tokenizer = load_tokenizer(args.model)
    prompt_ids = tokenizer(prompt)["input_ids"]
    if args.kv_positions != "cache":  # sink_window with cache positions runs past the trained length
        from leanlm.cli_support import fit_prompt
        from leanlm.models import load_config

        prompt_ids = fit_prompt(prompt_ids, args.max_new_tokens, load_config(args.model), args.truncate)
        prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True) if args.truncate else prompt
    model = load_model(args.model, args.dtype, args.device)
    apply_weight_format(model, args.weights, args.weight_group)
    policy = policy_from_args(args, tokenizer, model)
    ids = torch.tensor([prompt_ids], device=model.device)  # (1, prompt tokens)
    print(prompt, end="", flush=True)
    if args.draft is not None:
        return _generate_speculative(args, model, tokenizer, ids, sampling)
    with attach(model, policy) if policy else nullcontext(static_cache(model, ids.shape[1] + args.max_new_tokens)) as cache:
        generated: list[int] = []
        shown = ""
        for token in stream(model, ids, args.max_new_tokens, cache, sampling, compile=args.compile):
            generated.append(int(token[0]))
            text = tokenizer.decode(generated, skip_special_tokens=True)
            print(text[len(shown):], end="", flush=True)  # decode the whole tail: multi-token characters
            shown = text
            if generated[-1] == tokenizer.eos_token_id:
                break
        print()
        if policy is not None:
            log.info("kv cache (%s): %d tokens held of %d seen, %.2f MiB resident, %.2f MiB peak",
                     policy.name, cache.held_tokens(), cache.seen_tokens, cache.nbytes() / 2**20,
                     cache.peak_nbytes() / 2**20)
    return 0


def _generate_speculative(args: Namespace, model, tokenizer, ids, sampling) -> int:
    from leanlm.engine.speculative import SpeculativeStats, speculative_generate
    from leanlm.models import load_model

    draft = "ngram" if args.draft == "ngram" else load_model(args.draft, args.dtype, args.device)
    stats = SpeculativeStats()
    tokens = speculative_generate(model, draft, ids, args.max_new_tokens, args.draft_tokens, sampling,
                                  compile=args.compile, stats=stats)[0]
    tokens = tokens.tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id) + 1]
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    log.info("speculative: %d rounds, %d of %d draft tokens accepted (%.0f%%), %d proposals held back",
             stats.rounds, stats.accepted, stats.proposed, 100 * stats.acceptance_rate, stats.skipped)
    return 0


def run_eval_kv_cache(args: Namespace) -> int:
    """`leanlm eval --kv-cache P`: streaming perplexity through the policy vs the full cache, same windows."""
    from leanlm.evaluate.kv import StreamingProtocol, streaming_perplexity, streaming_reference
    from leanlm.kvcache import make_policy
    from leanlm.models import load_model, load_tokenizer
    from leanlm.report import atomic_write_json, atomic_write_text, git_info, staged_output, versions
    from leanlm.report.markdown import table
    from leanlm.report.plots import plot_kv_windows

    if args.split == "botchan" or args.text is not None:
        raise LeanLMError("--kv-cache evaluates on WikiText-2 (test or validation), not botchan or a --text")
    context = args.window or args.kv_context
    protocol = StreamingProtocol(args.split, context, args.kv_chunk, args.max_tokens)
    protocol.validate()
    policy_from_args(args)  # bad policy settings fail before the model loads
    out = _out_dir(args, "eval-kv")
    if args.kv_positions != "cache":
        _check_context(args.model, context, "--window" if args.window else "--kv-context")
    model, tokenizer = load_model(args.model, args.dtype, args.device), load_tokenizer(args.model)
    settings = {"position_mode": args.kv_positions} if args.kv_positions != "original" else {}
    factory = lambda tokens: make_policy(args.kv_cache, args.kv_budget, tokens, tokenizer, model, **settings)  # noqa: E731
    reference = streaming_reference(model, tokenizer, protocol)
    result = streaming_perplexity(model, tokenizer, factory, protocol, reference=reference)
    full = reference.result
    results = {"model": args.model, "command": _command_line(), "perplexity": result.perplexity,
               "protocol": result.protocol | {"data": _data_source(protocol.split)}, "kv_cache": result.policy,
               "kv_budget": args.kv_budget, "kv_budget_held": result.bytes_per_token / full.bytes_per_token,
               "kv_bytes_per_token": result.bytes_per_token, "kv_peak_bytes": result.peak_bytes,
               "ppl_ratio": result.perplexity / full.perplexity, "kl": result.kl,
               "top1_agreement": result.top1_agreement,
               "uncompressed": {"perplexity": full.perplexity, "kv_bytes_per_token": full.bytes_per_token},
               "bytes_ratio": result.bytes_per_token / full.bytes_per_token,
               "details": result.to_dict(), "versions": versions(), "git": git_info()}
    rows = [("perplexity (policy / full)", f"{result.perplexity:.3f} / {full.perplexity:.3f}  "
                                           f"(x{results['ppl_ratio']:.4f})"),
            ("KL to full cache (nats/token)", f"{result.kl:.5f}"),
            ("top-1 agreement", f"{result.top1_agreement:.4f}"),
            ("KV bytes/token (policy / full)", f"{result.bytes_per_token:,.0f} / {full.bytes_per_token:,.0f}  "
                                               f"({results['bytes_ratio']:.3f})"),
            ("protocol", f"{protocol.split}, windows of {context}, chunks of {protocol.chunk}, "
                         f"{result.tokens_scored} tokens scored, {result.protocol['dtype']}")]
    text = table(rows, header=("metric", args.kv_cache))
    held = results["kv_budget_held"]
    budget = f"budget {args.kv_budget:g}" + (f" requested, {held:.3g} held" if held > args.kv_budget * 1.02 else "")
    if held > args.kv_budget * 1.02:
        log.warning("leanlm: --kv-budget %g is below what %s can hold: it held %.3g of the full cache bytes "
                    "(the report gives both)", args.kv_budget, args.kv_cache, held)
    with staged_output(out) as stage:
        atomic_write_json(stage / "results.json", results)
        (stage / "plots").mkdir()
        plot_kv_windows(result.to_dict(), full.to_dict(), stage / "plots" / "kv_windows.png")
        atomic_write_text(stage / "report.md", f"# KV-cache policy {args.kv_cache} at {budget}\n\n"
                                               f"{text}\n\n![per-window NLL](plots/kv_windows.png)\n\n"
                                               f"Command: `{results['command']}`\n")
    print(text)
    print(f"\nwrote {out}/results.json and {out}/report.md")
    return 0
