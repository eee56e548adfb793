"""Benchmark: decode tokens/s of every way leanlm (and its peers) decode, side by side in one run.

    PYTHONPATH=src python benchmarks/decode_speed.py --out out/decode_speed.json \
        [--batches 1,4,16] [--contexts 512,4096,16384] [--new-tokens 128] [--methods ...] [--repeats 3]

For each (batch, context) cell, every method runs once untimed (warm-up: a compiled step compiles
there), then once per round, in a rotating order, for --repeats rounds; the median tokens/s is
reported (the machine is shared: read ratios, not absolute numbers). Tokens/s counts decode only:
from the first new token to the last, after the prompt (random token ids, the same for every
method) was prefilled. The memory bandwidth is measured in the same run (a large tensor copy); each
row's effective GB/s = (weight bytes + KV bytes read per step) x steps/s. A method name with the
suffix ``:aten`` runs that method with leanlm's CPU kernels off (engine/kernels; ATen's matmuls and
attention instead), ``:layers`` with transformers' layer code instead of the lean decode step
(engine/lean_step.py), ``:pywrapper`` with inductor's Python wrapper instead of its C++ one (compiled
methods); ``engine_static:layers:aten`` has both off. llama.cpp runs in its own venv
(benchmarks/llamacpp_env.sh) through benchmarks/llamacpp_driver.py, on a BF16 GGUF written from the
same weights, on Q8_0 / Q4_0 files llama.cpp's own quantizer makes from it (like for like with the
int8 / int4 rows), and on the bundled Q4_1; vLLM's CPU build in its own venv (benchmarks/vllm_env.sh) through
one persistent benchmarks/vllm_driver.py (offline ``LLM``, the same bf16 weights, prefix caching off).
Writes FILE.json (rows + protocol), FILE.md (table) and FILE.png (tokens/s vs context).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from benchmarks_common import bandwidth_gbs, markdown_table, plot_rows, weight_bytes
from leanlm.engine import Sampler, static_cache, stream
from leanlm.engine.compile import use_cpp_wrapper
from leanlm.engine.kernels import use_avx512, use_kernels
from leanlm.engine.lean_step import use_lean_step
from leanlm.engine.speculative import SpeculativeStats, speculative_generate
from leanlm.engine.weights import apply_weight_format, quantizer
from leanlm.kvcache import attach, make_policy
from leanlm.models import load_model
from leanlm.report import atomic_write_json, atomic_write_text, git_info, versions

METHODS = ["hf_dynamic", "hf_static", "engine_dynamic", "engine_static:layers:aten", "engine_static", "engine_compiled", "quantized@0.25",
           "heavy_hitter+int4@0.25", "weights_int8", "weights_int8_compiled", "weights_int4", "speculative_k2", "speculative_k4",
           "speculative_k6", "llamacpp_bf16", "llamacpp_q8_0", "llamacpp_q4_0", "llamacpp_q4_1", "vllm_bf16"]


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


class Timer:
    """Times decode: from the first new token to the last (prefill excluded)."""

    def __init__(self):
        self.first = self.last = None
        self.count = 0

    def tick(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # GPU work is queued: time what has finished
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.count += 1

    def steps_per_s(self) -> float:
        return (self.count - 1) / (self.last - self.first)


class HFTimer:
    """A transformers streamer: ``put`` is called with the prompt, then once per new token."""

    def __init__(self):
        self.timer, self.prompt_seen = Timer(), False

    def put(self, value):
        if self.prompt_seen:
            self.timer.tick()
        self.prompt_seen = True

    def end(self):
        pass


def run_hf(model, ids, new, kind):
    streamer = HFTimer()
    extra = {"cache_implementation": "static"} if kind == "static" else {}
    with torch.inference_mode(), use_kernels(False):  # stock transformers: ATen's matmuls
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, streamer=streamer, pad_token_id=0, **extra)
    return {"steps_per_s": streamer.timer.steps_per_s(), "kv_bytes": ids.shape[0] * (ids.shape[1] + new) * kv_bytes_per_token(model)}


def run_engine(model, ids, new, cache=None, compile=False, policy=None):
    timer = Timer()
    if policy is not None:
        with attach(model, policy) as cache:
            for _ in stream(model, ids, new, cache, Sampler()):
                timer.tick()
            return {"steps_per_s": timer.steps_per_s(), "kv_bytes": cache.nbytes()}
    for _ in stream(model, ids, new, cache, Sampler(), compile=compile):
        timer.tick()
    return {"steps_per_s": timer.steps_per_s(), "kv_bytes": ids.shape[0] * (ids.shape[1] + new) * kv_bytes_per_token(model)}


def run_speculative(model, draft, ids, new, k, reference):
    stats = SpeculativeStats()
    start = time.perf_counter()
    tokens = speculative_generate(model, draft, ids[:1], new, k=k, stats=stats)
    seconds = time.perf_counter() - start  # includes both prefills: compare with engine_total below
    return {"steps_per_s": new / seconds, "acceptance_rate": stats.acceptance_rate,
            "identical_to_greedy": bool(torch.equal(tokens, reference)), "includes_prefill": True,
            "kv_bytes": ids.shape[1] * kv_bytes_per_token(model)}


def engine_total(model, ids, new):
    """Engine greedy at batch 1 timed like speculative decoding (prefill included), and its tokens."""
    start = time.perf_counter()
    tokens = torch.stack(list(stream(model, ids[:1], new)), dim=1)
    return new / (time.perf_counter() - start), tokens


SWITCHES = {"aten": lambda: use_kernels(False), "layers": lambda: use_lean_step(False),  # method-name suffixes
            "pywrapper": lambda: use_cpp_wrapper(False), "avx2": lambda: use_avx512(False)}


def _switched_off(run, suffix, *args, **kwargs):
    with SWITCHES[suffix]():
        return run(*args, **kwargs)


def _with_kv(result: dict | None, kv_bytes: int) -> dict | None:
    return None if result is None else {"kv_bytes": kv_bytes} | result


def build_runners(args, model, draft, quantized_models, llama, vllm=None):
    """name → callable(ids, new) -> row fields; None when the method is not available (reason recorded)."""
    runners, skipped = {}, {}
    for name in args.methods:
        base_name, _, suffix = name.rpartition(":")
        if base_name and suffix in SWITCHES:  # the same method with one part of leanlm off: what that part gains
            base, base_skipped = build_runners(argparse.Namespace(**vars(args) | {"methods": [base_name]}), model, draft,
                                               quantized_models, llama, vllm)
            runners |= {name: lambda ids, new, r=run, s=suffix: _switched_off(r, s, ids, new) for run in base.values()}
            skipped |= {name: why for why in base_skipped.values()}
            continue
        if name in ("hf_dynamic", "hf_static"):
            runners[name] = lambda ids, new, kind=name[3:]: run_hf(model, ids, new, kind)
        elif name == "engine_dynamic":
            runners[name] = lambda ids, new: run_engine(model, ids, new, DynamicCache())
        elif name in ("engine_static", "engine_compiled"):
            runners[name] = lambda ids, new, c=name == "engine_compiled": run_engine(
                model, ids, new, static_cache(model, ids.shape[1] + new), compile=c)
        elif "@" in name:
            policy, budget = name.split("@")
            runners[name] = lambda ids, new, p=policy, b=float(budget): run_engine(
                model, ids, new, policy=make_policy(p, b, ids.shape[1] + new))
        elif name.startswith("weights_"):  # weights_int8, weights_int4 (eager), weights_int8_compiled, ...
            scheme = name.removesuffix("_compiled")
            if scheme not in quantized_models:
                skipped[name] = "not available: leanlm.transforms.quantize is not in this install"
                continue
            runners[name] = lambda ids, new, m=quantized_models[scheme], c=name.endswith("_compiled"): run_engine(
                m, ids, new, static_cache(m, ids.shape[1] + new), compile=c)
        elif name.startswith("speculative_k"):
            runners[name] = lambda ids, new, k=int(name[13:]): (
                run_speculative(model, draft, ids, new, k, engine_total(model, ids, new)[1]) if ids.shape[0] == 1 else None)
        elif name.startswith("llamacpp_"):
            runners[name] = lambda ids, new, n=name: _with_kv(llama(n, ids, new), ids.shape[1] * kv_bytes_per_token(model))
        elif name == "vllm_bf16":
            runners[name] = lambda ids, new: _with_kv(vllm(ids, new), ids.shape[0] * (ids.shape[1] + new) * kv_bytes_per_token(model))
        else:
            skipped[name] = "unknown method"
    return runners, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file; .md and .png are written beside it")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--contexts", default="512,4096,16384")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--draft-keep", type=int, default=10, help="speculative draft: keep this many first layers")
    parser.add_argument("--weight-group", type=int, default=32, help="int4: weights per scale (the head stays int8)")
    parser.add_argument("--llamacpp-venv", type=Path, default=Path(".venv-llamacpp"))
    parser.add_argument("--vllm-venv", type=Path, default=Path(".venv-vllm"), help="vLLM's CPU build (benchmarks/vllm_env.sh)")
    parser.add_argument("--gguf-dir", type=Path, default=Path("out/gguf"), help="where the BF16 GGUF is written")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "bfloat16")
    model.config.max_position_embeddings = max(model.config.max_position_embeddings,
                                               max(int(c) for c in args.contexts.split(",")) + args.new_tokens)
    draft = copy.deepcopy(model)
    from leanlm.transforms.prune_layers import prune_layers

    prune_layers(draft, range(args.draft_keep, model.config.num_hidden_layers))
    quantized_models = {}
    if quantizer() is not None:
        for scheme in ("int8", "int4"):
            if f"weights_{scheme}" in (m.split(":")[0].removesuffix("_compiled") for m in args.methods):
                quantized_models[f"weights_{scheme}"] = copy.deepcopy(model)  # as `leanlm generate --weights` does
                apply_weight_format(quantized_models[f"weights_{scheme}"], scheme, args.weight_group)
    from llamacpp_bridge import LlamaCpp
    from vllm_bridge import VLLM

    llama = LlamaCpp(args.llamacpp_venv, args.gguf_dir, args.model, args.threads)
    longest = max(int(c) for c in args.contexts.split(",")) + args.new_tokens + 16
    vllm = VLLM(args.vllm_venv, args.model, longest, max(int(b) for b in args.batches.split(",")), args.threads)
    runners, skipped = build_runners(args, model, draft, quantized_models, llama, vllm)
    bandwidth = bandwidth_gbs(args.threads)
    try:
        rows = measure_grid(args, model, runners, quantized_models, llama, bandwidth)
    finally:
        vllm.close()
    report = {"rows": rows, "skipped": skipped | llama.skipped | vllm.skipped, "bandwidth_gbs": bandwidth,
              "bandwidth_after_gbs": bandwidth_gbs(args.threads),
              "protocol": {"batches": args.batches, "contexts": args.contexts, "new_tokens": args.new_tokens,
                           "repeats": args.repeats, "threads": args.threads, "dtype": "bfloat16",
                           "prompt": "random token ids, same for every method", "draft": f"first {args.draft_keep} layers",
                           "timing": "decode only, first to last new token; speculative includes prefill "
                                     "(compare with engine_total_b1)", "machine": "shared, noisy: read ratios"},
              "versions": versions(), "git": git_info()}
    atomic_write_json(args.out, report)
    atomic_write_text(args.out.with_suffix(".md"), markdown_table(rows, report))
    plot_rows(rows, args.out.with_suffix(".png"))
    print(markdown_table(rows, report))


def measure_grid(args, model, runners, quantized_models, llama, bandwidth) -> list[dict]:
    rows = []
    wbytes = weight_bytes(model)
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
            results: dict[str, list[dict]] = {name: [] for name in runners}
            extra = {"engine_total_b1": []}
            names = list(runners)
            for name in names:  # untimed warm-up with the timed shapes (a compiled step compiles per cache size)
                _safe(runners[name], ids, args.new_tokens)
            for round_ in range(args.repeats):
                order = names[round_ % len(names):] + names[: round_ % len(names)]  # rotate: drift hits all
                for name in order:
                    result = _safe(runners[name], ids, args.new_tokens)
                    if result is not None:
                        results[name].append(result)
                if batch == 1 and any(n.startswith("speculative") for n in names):
                    extra["engine_total_b1"].append({"steps_per_s": engine_total(model, ids, args.new_tokens)[0],
                                                     "kv_bytes": context * kv_bytes_per_token(model)})
            for name, runs in (results | extra).items():
                if not runs:
                    continue
                weights = quantized_models.get(name.split(":")[0].removesuffix("_compiled"), model)
                row = _summarise(name, runs, batch, context, weights, wbytes, bandwidth)
                rows.append(row)
                print(row, flush=True)
    return rows


def _safe(runner, ids, new):
    try:
        return runner(ids, new)
    except Exception as error:  # noqa: BLE001 - one failing method is recorded, the benchmark goes on
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def _summarise(name, runs, batch, context, model, base_weight_bytes, bandwidth) -> dict:
    good = [r for r in runs if "error" not in r]
    row = {"method": name, "batch": batch, "context": context, "runs": len(good)}
    if not good:
        return row | {"error": runs[0]["error"]}
    steps = statistics.median(r["steps_per_s"] for r in good)
    wbytes = good[0].get("weight_bytes", weight_bytes(model) if model is not None else base_weight_bytes)
    kv = statistics.median(r["kv_bytes"] for r in good)
    row |= {"tokens_per_s": steps * batch, "steps_per_s": steps, "ms_per_step": 1000 / steps,
            "weight_bytes": wbytes, "kv_bytes": kv, "effective_gbs": (wbytes + kv) * steps / 1e9}
    row["bandwidth_share"] = row["effective_gbs"] / bandwidth
    for key in ("acceptance_rate", "identical_to_greedy", "includes_prefill", "note"):
        if key in good[0]:
            row[key] = good[0][key]
    return row


if __name__ == "__main__":
    main()
