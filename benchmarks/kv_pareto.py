"""Benchmark: quality vs KV bytes of every run-time cache policy, side by side with NVIDIA kvpress.

    .venv/bin/python benchmarks/kv_pareto.py --out runs/kv_pareto.json

One process, one model (SmolLM2-135M, bf16), the same token windows for every row:
- continuation protocol (shared with kvpress): prefill a WikiText-2 test context through the policy,
  then score the next tokens on the compressed cache → `ppl_ratio`, `kl`, measured `bytes_per_token`;
- streaming protocol (leanlm only: kvpress presses act on a prefill, not on a stream): the text fed
  in chunks through the policy, every token scored → `stream_ppl_ratio`, `stream_kl`;
- passkey retrieval at 2K/4K/8K tokens → `passkey` (accuracy by length) and `passkey_normalised`
  (÷ the uncompressed run's own accuracy), and the answer log-likelihood;
- decode tokens/s after a compressed prefill, alternated with the full cache's (A, B, A, B ...,
  `--speed-rounds` rounds) and reported as medians and their ratio (the machine is shared and noisy);
- kvpress presses on the same windows through `benchmarks/kvpress_driver.py` in its own virtualenv
  (it pins an older transformers), as rows with `source: kvpress`, scored on exactly leanlm's windows
  (the driver echoes a digest of the token ids it scored; a mismatch stops the run).
The baseline row ("full") is measured, not written: the uncompressed cache run again through every
protocol and scored against the reference run (its KL and ratios are what the code computes).
Bytes: `bytes_per_token` is what a policy counts against its budget (a two-tier cache: its fast
tier); `total_bytes_per_token` adds a two-tier cache's slow tier (in RAM here).
Writes FILE.json, FILE.md (table) and FILE-pareto.png. Flat memory over a long generation is
`benchmarks/kv_long_generation.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from leanlm.errors import LeanLMError
from leanlm.evaluate.kv import (ContinuationProtocol, PasskeyProtocol, StreamingProtocol,
                                          continuation_perplexity, continuation_reference, continuation_windows,
                                          normalise, passkey_eval, passkey_prompts, streaming_perplexity,
                                          streaming_reference)
from leanlm.evaluate.side_by_side import alternate, median_ratio
from leanlm.generate import stream
from leanlm.kvcache import attach, make_policy
from leanlm.kvcache.sentence import tier_stats
from leanlm.models import load_model, load_tokenizer
from leanlm.models.loading import resolve_source
from leanlm.report import atomic_write_json, git_info, versions

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ["quantized", "quantized:rotate=0", "sink_window", "heavy_hitter", "observation_window",
            "heavy_hitter+int4:group=64", "observation_window+int4:group=64"]
PRESSES = ["streaming_llm", "snapkv", "knorm", "expected_attention", "observed_attention", "quantized"]


def windows_digest(windows: list[list[int]]) -> str:
    """sha256 of the token ids of every window, in order (kvpress_driver.py computes the same)."""
    return hashlib.sha256(json.dumps([[int(t) for t in w] for w in windows]).encode()).hexdigest()


def decode_speed(model, policy_factory, context_ids: list[int], tokens: int = 32, warmup: int = 2,
                 stats: dict | None = None) -> float:
    """Tokens/s of greedy decoding after a (compressed) prefill of ``context_ids``.

    ``stats``: filled with a two-tier policy's tier bytes and slow-tier traffic per generated token.
    """
    ids = torch.tensor([context_ids])
    policy = policy_factory(len(context_ids) + tokens) if policy_factory else None
    with attach(model, policy) if policy else _null() as cache:
        steps = stream(model, ids, tokens + warmup, cache)
        for _ in range(warmup):
            next(steps)
        start = time.perf_counter()
        for _ in steps:
            pass
        seconds = time.perf_counter() - start
        if stats is not None and policy is not None and policy.name == "sentence_tier":
            stats |= tier_stats(cache).to_dict()
        return tokens / seconds


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def side_by_side_decode(model, factory, context_ids: list[int], args, stats: dict | None = None) -> dict:
    """Decode tokens/s of the full cache and of ``factory``'s policy, alternated; medians and their ratio."""
    runs = alternate({"full": lambda: decode_speed(model, None, context_ids, args.decode_tokens),
                      "policy": lambda: decode_speed(model, factory, context_ids, args.decode_tokens, stats=stats)},
                     args.speed_rounds)
    both = median_ratio(runs["full"], runs["policy"])
    return {"decode_tokens_per_s": both["candidate"], "decode_full_tokens_per_s": both["base"],
            "decode_speed_ratio": both["ratio"], "decode_runs": runs}


def row(method: str, source: str, budget: float, cont, baseline_cont, **extra) -> dict:
    return {"method": method, "source": source, "budget": budget, "bytes_per_token": cont.bytes_per_token,
            "total_bytes_per_token": cont.total_bytes_per_token,
            "ppl": cont.perplexity, "ppl_ratio": cont.perplexity / baseline_cont.perplexity, "kl": cont.kl,
            "top1_agreement": cont.top1_agreement, "peak_bytes": cont.peak_bytes, **extra}


def run_leanlm(model, tok, args, refs: dict, passkey_items, baseline_passkey, checkpoint=None) -> list[dict]:
    """One row per (policy, budget); ``checkpoint(rows)`` after each, so an interrupted run keeps them."""
    rows = []
    for name in args.policies:
        for budget in args.budgets:
            factory = (lambda n, name=name, budget=budget: make_policy(name, budget, n, tok, model))
            started = time.perf_counter()
            cont = continuation_perplexity(model, tok, factory, refs["cont_protocol"], reference=refs["cont"])
            extra = {"policy": factory(args.context).describe()}
            if budget in args.stream_budgets:
                streamed = streaming_perplexity(model, tok, factory, refs["stream_protocol"], reference=refs["stream"])
                extra |= {"stream_ppl_ratio": streamed.perplexity / refs["stream"].result.perplexity,
                          "stream_kl": streamed.kl, "stream_bytes_per_token": streamed.bytes_per_token,
                          "stream_total_bytes_per_token": streamed.total_bytes_per_token}
            if budget in args.passkey_budgets:
                extra |= passkey_fields(model, tok, factory, passkey_items, refs["passkey_protocol"], baseline_passkey)
            tiers = {}
            extra |= side_by_side_decode(model, factory, refs["cont_windows"][0][: args.context], args, stats=tiers)
            if tiers:
                extra["tiers"] = tiers  # fast/slow bytes and bytes moved per generated token
            extra["seconds"] = time.perf_counter() - started
            rows.append(row(name, "leanlm", budget, cont, refs["cont"].result, **extra))
            print(f"{name:>26} @ {budget:<5}: ppl x{rows[-1]['ppl_ratio']:.4f}  kl {cont.kl:.4f}  "
                  f"{cont.bytes_per_token:,.0f} B/token", file=sys.stderr, flush=True)
            if checkpoint:
                checkpoint(rows)
    return rows


def passkey_fields(model, tok, policy, items, protocol, baseline) -> dict:
    result = passkey_eval(model, tok, policy, items, protocol)
    norm = normalise(result, baseline) if baseline is not None else None
    return {"passkey": result.accuracy, "passkey_loglik": result.answer_loglik,
            "passkey_normalised": norm["accuracy"] if norm else None,
            "passkey_loglik_delta": norm["answer_loglik"] if norm else None}


def run_kvpress(args, refs: dict, passkey_items) -> dict:
    """kvpress rows from the driver in its own virtualenv; on failure, one error entry saying why."""
    env = subprocess.run(["bash", str(ROOT / "benchmarks/kvpress_env.sh")], capture_output=True, text=True)
    if env.returncode:
        return {"error": f"kvpress environment could not be built: {env.stderr.strip().splitlines()[-1:]}"}
    model_dir, _ = resolve_source(args.model)
    request = {"model": str(model_dir), "dtype": "bfloat16", "presses": args.presses, "budgets": args.budgets,
               "attn_implementation": args.kvpress_attn,
               "windows": refs["cont_windows"], "continuation": args.continuation,
               "passkey": [{"ids": it.ids, "answer": it.answer_ids, "length": it.length, "depth": it.depth}
                           for it in passkey_items],
               "passkey_budgets": args.passkey_budgets, "decode_tokens": 32}
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "kvpress.json"
        req.write_text(json.dumps(request))
        python = ROOT / ".venv-kvpress/bin/python"
        done = subprocess.run([str(python), str(ROOT / "benchmarks/kvpress_driver.py"), "--request", str(req),
                               "--out", str(out)], stderr=None)
        if done.returncode or not out.exists():
            return {"error": f"kvpress driver exited with code {done.returncode}"}
        result = json.loads(out.read_text())
    check_same_windows(result.get("windows_sha256"), windows_digest(refs["cont_windows"]), "the kvpress driver")
    return result


def check_same_windows(theirs: str | None, ours: str, who: str) -> None:
    """Stop unless ``who`` scored exactly the token ids of leanlm's windows (digests equal)."""
    if theirs != ours:
        raise LeanLMError(f"{who} scored other windows than leanlm's rows (token-id digest {theirs} != {ours}): "
                          "its rows would not be comparable")


def kvpress_rows(result: dict, lean_baseline_ppl: float) -> list[dict]:
    """Driver rows with ratios against kvpress's own uncompressed run (same windows, its transformers)."""
    base = result["baseline"]
    rows = []
    for r in result["rows"]:
        ok = r.get("error") is None
        rows.append({**r, "source": "kvpress", "ppl_ratio": r["ppl"] / base["ppl"] if ok else None,
                     "total_bytes_per_token": r.get("bytes_per_token"),  # one tier: a DynamicCache
                     "passkey_normalised": _norm(r.get("passkey"), base.get("passkey")) if ok else None})
    return rows


def _norm(acc: dict | None, base: dict | None) -> dict | None:
    if not acc or not base:
        return None
    return {k: (acc[k] / base[k] if base.get(k) else None) for k in acc}


def targets(rows: list[dict], baseline_bytes: float) -> dict:
    """The issue's targets: best ppl ratio at ≥4× and ≥8× fewer bytes, per source."""
    out = {}
    for factor, goal in ((4, 1.02), (8, 1.08)):
        for source in ("leanlm", "kvpress"):
            fits = [r for r in rows if r["source"] == source and r.get("ppl_ratio") is not None
                    and r["bytes_per_token"] <= baseline_bytes / factor]
            best = min(fits, key=lambda r: r["ppl_ratio"], default=None)
            out[f"{source}_at_{factor}x_fewer_bytes"] = None if best is None else {
                "method": best["method"], "budget": best["budget"], "ppl_ratio": best["ppl_ratio"],
                "bytes_per_token": best["bytes_per_token"], "goal": goal, "met": best["ppl_ratio"] <= goal}
    return out


PPL_HOLDS = 1.05  # a perplexity ratio this close to 1 can hide a retrieval loss: such rows are flagged


def retrieval_flag(row: dict) -> str | None:
    """'perplexity holds, retrieval drops at N tokens' when both are true of a row, else None."""
    norm = row.get("passkey_normalised") or {}
    dropped = [length for length, ratio in norm.items() if ratio is not None and ratio < 1]
    if not dropped or row.get("ppl_ratio") is None or row["ppl_ratio"] > PPL_HOLDS:
        return None
    return f"perplexity holds, retrieval drops at {', '.join(dropped)} tokens"


def markdown(result: dict) -> str:
    lines = ["| method | source | budget | bytes/token | total bytes/token | ppl ratio | KL | stream ppl ratio | "
             "passkey (norm.) | decode tok/s | decode ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    def fmt(x, spec=".4f"):  # noqa: E306
        return "—" if x is None else format(x, spec)
    for r in [result["baseline"], *result["rows"]]:
        pk = r.get("passkey_normalised") or r.get("passkey")
        pk = ", ".join(f"{k}: {fmt(v, '.2f')}" for k, v in pk.items()) if pk else (r.get("error") or "—")
        pk += f" ⚠ {r['flag']}" if r.get("flag") else ""
        lines.append(f"| {short(r['method'])} | {r['source']} | {r['budget']} | {fmt(r.get('bytes_per_token'), ',.0f')} | "
                     f"{fmt(r.get('total_bytes_per_token'), ',.0f')} | "
                     f"{fmt(r.get('ppl_ratio'))} | {fmt(r.get('kl'))} | {fmt(r.get('stream_ppl_ratio'))} | {pk} | "
                     f"{fmt(r.get('decode_tokens_per_s'), '.1f')} | {fmt(r.get('decode_speed_ratio'), '.2f')} |")
    return "\n".join(lines) + "\n"


def short(method: str) -> str:
    """A method name for tables and legends: file paths in settings shortened to their file name."""
    return re.sub(r"(maps|store_dir)=[^,]*/", r"\1=", method)


def pareto_plot(result: dict, path: Path, top: float = 1.6, log_y: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    methods = sorted({(r["method"], r["source"]) for r in result["rows"] if r.get("ppl_ratio") is not None})
    colors = plt.get_cmap("tab20").colors
    # top: a collapsed method (ratios of 2-4) would flatten everyone else: clip, and say so
    clipped = [r for r in result["rows"] if (r.get("ppl_ratio") or 0) > top]
    for index, (method, source) in enumerate(methods):
        pts = sorted((r["bytes_per_token"], r["ppl_ratio"]) for r in result["rows"]
                     if r["method"] == method and r["source"] == source and r.get("ppl_ratio") is not None)
        ax.plot(*zip(*pts), marker="o" if source == "leanlm" else "x", linestyle="-" if source == "leanlm" else ":",
                label=f"{short(method)} ({source})", color=colors[index % len(colors)])
    base = result["baseline"]
    ax.scatter([base["bytes_per_token"]], [base.get("ppl_ratio", 1.0)], color="black", zorder=5, label="full bf16 cache")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_ylim(0.98, top)
    if clipped:
        ax.text(0.01, 0.98, "off the chart: " + ", ".join(f"{r['method']}@{r['budget']} x{r['ppl_ratio']:.2f}"
                                                          for r in clipped),
                transform=ax.transAxes, fontsize=7, va="top")
    ax.set_xlabel("measured KV bytes per context token (log)")
    ax.set_ylabel("perplexity / full cache (continuation protocol)")
    ax.set_title("KV-cache policies on SmolLM2-135M, WikiText-2 test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves stay readable
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON file to write (never overwritten)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policies", nargs="+", default=POLICIES, metavar="POLICY",
                   help="policy specs, space-separated (settings after a colon: 'sentence_tier:max_sentence=32,"
                        "coarse=mean'); plain names may also be comma-separated")
    p.add_argument("--presses", type=lambda s: s.split(","), default=PRESSES)
    p.add_argument("--budgets", type=floats, default=[0.5, 0.25, 0.125], help="fractions of the full cache bytes")
    p.add_argument("--stream-budgets", type=floats, default=[0.25, 0.125], help="budgets also run on the streaming protocol")
    p.add_argument("--passkey-budgets", type=floats, default=[0.25], help="budgets also run on passkey retrieval")
    p.add_argument("--context", type=int, default=2048, help="continuation protocol: context tokens")
    p.add_argument("--continuation", type=int, default=128, help="continuation protocol: scored tokens")
    p.add_argument("--windows", type=int, default=8, help="continuation protocol: windows")
    p.add_argument("--stream-tokens", type=int, default=4096, help="streaming protocol: tokens (windows of --context)")
    p.add_argument("--stream-chunk", type=int, default=32, help="streaming protocol: tokens per forward")
    p.add_argument("--passkey-lengths", type=ints, default=(2048, 4096, 8192))
    p.add_argument("--passkey-depths", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.2, 0.5, 0.8))
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode-speed run")
    p.add_argument("--speed-rounds", type=int, default=3, help="alternated full/policy decode runs (medians)")
    p.add_argument("--no-kvpress", action="store_true", help="skip the kvpress rows")
    p.add_argument("--kvpress-from", type=Path, default=None,
                   help="add kvpress rows to an earlier run's JSON (its leanlm rows are kept as they are; the "
                        "windows and passkey prompts are rebuilt from its protocol) and write --out")
    p.add_argument("--kvpress-attn", default="eager", choices=["eager", "sdpa"],
                   help="kvpress attention kernel; observed_attention needs eager (default: %(default)s)")
    p.add_argument("--add-to", type=Path, default=None,
                   help="run --policies on an earlier run's protocol (rebuilt from its JSON, with its own fresh "
                        "uncompressed reference) and write its rows plus the new ones to --out; kvpress is not run")
    args = p.parse_args()
    args.policies = [part for spec in args.policies for part in ([spec] if ":" in spec else spec.split(","))]
    return args


def earlier_protocols(earlier: dict) -> tuple[ContinuationProtocol, StreamingProtocol, PasskeyProtocol]:
    cont, stream_, pk = (earlier["protocol"][k] for k in ("continuation", "streaming", "passkey"))
    return (ContinuationProtocol(split=cont["split"], context=cont["context"], continuation=cont["continuation"],
                                 windows=cont["windows"], join=cont["join"]),
            StreamingProtocol(split=stream_["split"], context=stream_["context"], chunk=stream_["chunk"],
                              max_tokens=stream_["max_tokens"], join=stream_["join"]),
            PasskeyProtocol(lengths=tuple(pk["lengths"]), depths=tuple(pk["depths"]), seed=pk["seed"],
                            prefill_chunk=pk["prefill_chunk"]))


def add_policies(args) -> int:
    """--add-to: new leanlm rows on an earlier run's windows and prompts, merged into its rows."""
    earlier = json.loads(args.add_to.read_text())
    if earlier["protocol"].get("model", args.model) != args.model:
        raise LeanLMError(f"'{args.add_to}' was measured on {earlier['protocol']['model']}, not {args.model}")
    cont, stream_, pk = earlier_protocols(earlier)
    args.context, args.continuation = cont.context, cont.continuation
    model, tok = load_model(args.model, "bfloat16"), load_tokenizer(args.model)
    refs = {"cont_protocol": cont, "stream_protocol": stream_, "passkey_protocol": pk,
            "cont_windows": continuation_windows(tok, cont), "cont": continuation_reference(model, tok, cont),
            "stream": streaming_reference(model, tok, stream_)}
    items = passkey_prompts(tok, pk)
    base_passkey = passkey_eval(model, tok, None, items, pk) if args.passkey_budgets else None
    new = run_leanlm(model, tok, args, refs, items, base_passkey)
    replaced = {(r["method"], r["budget"]) for r in new}
    rows = [r for r in earlier["rows"] if (r["method"], r["budget"]) not in replaced] + new
    result = {**earlier, "rows": rows, "targets": targets(rows, earlier["baseline"]["bytes_per_token"]),
              "added": earlier.get("added", []) + [{
                  "policies": args.policies, "budgets": args.budgets, "command": " ".join(sys.argv),
                  "reference_ppl": refs["cont"].result.perplexity, "git": git_info()}]}
    write_outputs(result, args.out)
    return 0


def add_kvpress(args) -> int:
    """--kvpress-from: the earlier run's rows + kvpress rows on the same windows, written to --out."""
    earlier = json.loads(args.kvpress_from.read_text())
    tok = load_tokenizer(args.model)
    protocol, _, pk = earlier_protocols(earlier)  # split, join and prefill chunk included: leanlm's own windows
    windows = continuation_windows(tok, protocol)
    if earlier["protocol"].get("continuation_windows_sha256"):
        check_same_windows(windows_digest(windows), earlier["protocol"]["continuation_windows_sha256"],
                           "the windows rebuilt from the earlier run's protocol")
    items = [it for it in passkey_prompts(tok, pk) if it.length in args.passkey_lengths]
    args.continuation = protocol.continuation
    kvpress = run_kvpress(args, {"cont_windows": windows}, items)
    rerun = {f"kvpress:{press}" for press in args.presses}  # earlier rows of other presses are kept
    rows = [r for r in earlier["rows"] if r["source"] != "kvpress" or r["method"] not in rerun]
    if "rows" in kvpress:
        rows += kvpress_rows(kvpress, earlier["baseline"]["ppl"])
    result = {**earlier, "rows": rows, "targets": targets(rows, earlier["baseline"]["bytes_per_token"]),
              "kvpress": {k: v for k, v in kvpress.items() if k != "rows"} | {"added_by": "--kvpress-from"}}
    write_outputs(result, args.out)
    return 0


def write_outputs(result: dict, out: Path) -> None:
    for r in result["rows"]:
        r["flag"] = retrieval_flag(r)
    atomic_write_json(out, result)
    out.with_suffix(".md").write_text(markdown(result))
    pareto_plot(result, out.with_name(out.stem + "-pareto.png"))
    print(markdown(result))


def main() -> int:
    args = parse_args()
    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
    if args.kvpress_from:
        return add_kvpress(args)
    if args.add_to:
        return add_policies(args)
    torch.manual_seed(0)
    model, tok = load_model(args.model, "bfloat16"), load_tokenizer(args.model)
    refs = {"cont_protocol": ContinuationProtocol(context=args.context, continuation=args.continuation,
                                                  windows=args.windows),
            "stream_protocol": StreamingProtocol(context=args.context, chunk=args.stream_chunk,
                                                 max_tokens=args.stream_tokens),
            "passkey_protocol": PasskeyProtocol(lengths=args.passkey_lengths, depths=args.passkey_depths)}
    refs["cont_windows"] = continuation_windows(tok, refs["cont_protocol"])
    refs["cont"] = continuation_reference(model, tok, refs["cont_protocol"])
    refs["stream"] = streaming_reference(model, tok, refs["stream_protocol"])
    items = passkey_prompts(tok, refs["passkey_protocol"])
    base_passkey = passkey_eval(model, tok, None, items, refs["passkey_protocol"])
    base = refs["cont"].result
    baseline = measured_baseline(model, tok, args, refs, items, base_passkey)
    partial = args.out.with_name(args.out.stem + ".partial.json")  # the rows so far, if the run is interrupted
    rows = run_leanlm(model, tok, args, refs, items, base_passkey,
                      checkpoint=lambda done: atomic_write_json(partial, assemble(args, refs, baseline, done, None)))
    kvpress = None if args.no_kvpress else run_kvpress(args, refs, items)
    if kvpress and "rows" in kvpress:
        rows += kvpress_rows(kvpress, base.perplexity)
    write_outputs(assemble(args, refs, baseline, rows, kvpress), args.out)
    partial.unlink(missing_ok=True)
    return 0


def measured_baseline(model, tok, args, refs: dict, items, base_passkey) -> dict:
    """The "full" row: the uncompressed cache run again through every protocol, scored like any policy
    against the reference runs, so its KL and ratios are measured (they come out 0 and 1 only if the
    runs are deterministic), and its decode speed alternated with itself."""
    cont = continuation_perplexity(model, tok, None, refs["cont_protocol"], reference=refs["cont"])
    streamed = streaming_perplexity(model, tok, None, refs["stream_protocol"], reference=refs["stream"])
    context_ids = refs["cont_windows"][0][: args.context]
    runs = alternate({"a": lambda: decode_speed(model, None, context_ids, args.decode_tokens),
                      "b": lambda: decode_speed(model, None, context_ids, args.decode_tokens)}, args.speed_rounds)
    both = median_ratio(runs["a"], runs["b"])
    return row("full", "leanlm", 1.0, cont, refs["cont"].result, policy={"policy": "none", "cache": "DynamicCache"},
               stream_ppl=streamed.perplexity, stream_ppl_ratio=streamed.perplexity / refs["stream"].result.perplexity,
               stream_kl=streamed.kl, stream_bytes_per_token=streamed.bytes_per_token,
               stream_total_bytes_per_token=streamed.total_bytes_per_token,
               **passkey_fields(model, tok, None, items, refs["passkey_protocol"], base_passkey),
               decode_tokens_per_s=statistics.median(runs["a"] + runs["b"]), decode_speed_ratio=both["ratio"],
               decode_runs=runs)


def assemble(args, refs: dict, baseline: dict, rows: list[dict], kvpress: dict | None) -> dict:
    return {"protocol": {"model": args.model, "continuation": refs["cont"].result.protocol,
                         "continuation_windows_sha256": windows_digest(refs["cont_windows"]),
                         "streaming": refs["stream"].result.protocol,
                         "passkey": dataclasses.asdict(refs["passkey_protocol"])},
            "baseline": baseline, "rows": rows, "targets": targets(rows, baseline["bytes_per_token"]),
            "kvpress": None if kvpress is None else {k: v for k, v in kvpress.items() if k not in ("rows",)},
            "versions": versions(), "git": git_info()}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LeanLMError as err:
        print(f"kv_pareto: error: {err}", file=sys.stderr)
        sys.exit(2)
