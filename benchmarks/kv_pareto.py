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
import json
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

from kv_rows import check_same_windows, row, targets, windows_digest, write_outputs

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ["quantized", "quantized:rotate=0", "sink_window", "heavy_hitter", "observation_window",
            "heavy_hitter+int4:group=64", "observation_window+int4:group=64"]
PRESSES = ["streaming_llm", "snapkv", "knorm", "expected_attention", "observed_attention", "quantized"]


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
    p.add_argument("--kvpress-rows", type=Path, default=None,
                   help="with --kvpress-from: take the kvpress rows from this earlier --kvpress-from output instead "
                        "of running the driver (both halves of a run in parallel); its windows digest must match")
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
    kvpress = (kvpress_from_file(args.kvpress_rows, earlier) if args.kvpress_rows
               else run_kvpress(args, {"cont_windows": windows}, items))
    rerun = {f"kvpress:{press}" for press in args.presses}  # earlier rows of other presses are kept
    rows = [r for r in earlier["rows"] if r["source"] != "kvpress" or r["method"] not in rerun]
    if "rows" in kvpress:
        rows += kvpress_rows(kvpress, earlier["baseline"]["ppl"])
    result = {**earlier, "rows": rows, "targets": targets(rows, earlier["baseline"]["bytes_per_token"]),
              "kvpress": {k: v for k, v in kvpress.items() if k != "rows"} | {"added_by": "--kvpress-from"}}
    write_outputs(result, args.out)
    return 0


def kvpress_from_file(path: Path, earlier: dict) -> dict:
    """The driver result kept in an earlier --kvpress-from output (its kvpress rows back in driver form),
    refused unless it scored the same windows as ``earlier``."""
    other = json.loads(path.read_text())
    check_same_windows(other["protocol"].get("continuation_windows_sha256"),
                       earlier["protocol"]["continuation_windows_sha256"], f"'{path}'")
    if not other.get("kvpress") or other["kvpress"].get("error"):
        raise LeanLMError(f"'{path}' holds no kvpress result: {(other.get('kvpress') or {}).get('error')}")
    drop = {"source", "ppl_ratio", "total_bytes_per_token", "passkey_normalised", "flag"}
    rows = [{k: v for k, v in r.items() if k not in drop} for r in other["rows"] if r["source"] == "kvpress"]
    return {k: v for k, v in other["kvpress"].items() if k != "added_by"} | {"rows": rows, "merged_from": str(path)}


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
