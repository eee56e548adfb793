"""Benchmark: decode speed through compressed KV caches vs the full cache, at long context.

    PYTHONPATH=src .venv/bin/python benchmarks/kv_decode_speed.py --out runs/kv/decode_speed.json
    PYTHONPATH=src .venv/bin/python benchmarks/kv_decode_speed.py --out runs/kv/profile.json --profile

SmolLM2-135M in bfloat16, 2 threads. One prefill of --seed-context random tokens through a plain
DynamicCache gives every layer's K/V (saved under runs/ and reused); each method's cache is then
*seeded* from the first C tokens of it (the policy's own ``update`` on those K/V, as a prefill would
call it; attention-scored policies get the last token's key as a stand-in query for that one step),
so the cache state has the shape a real prefill leaves, without one long prefill per method. Then
--new-tokens decode steps are timed, one token each, through ``model(..., cache=...)``; with
``--engine``, through leanlm's engine instead (``engine/lean_step.py``: the full cache as a static
cache, ``quantized`` through its C++ kernel; other policies through the model's forward).

Methods alternate A, B, C, D within each round (the machine is shared and noisy); the JSON gives
per-round tokens/s, medians, each method's ratio to the full cache in the same run, and the cache
bytes really held after the decode. ``--profile`` instead breaks each method's decode step into the
cache update, the attention function and the rest (model weights, Python), with what is nested in
them: dequantize, quantize, attention scoring, gather/eviction, the fused kernel (wrapped timers).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from transformers import DynamicCache

from leanlm.engine import kernels, static_cache
from leanlm.engine.decode import DecodeState, forward
from leanlm.engine.lean_step import lean_step
from leanlm.engine.streaming_linear import enable_streaming_linears
from leanlm.errors import LeanLMError
from leanlm.kvcache import attach, make_policy
from leanlm.models import load_model
from leanlm.models.compat import with_cache
from leanlm.report import atomic_write_json, git_info, versions

METHODS = ("full", "quantized", "heavy_hitter+int4", "heavy_hitter")


def prefill_kv(model, context: int, path: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) after a ``context``-token random prefill, (1, kv_heads, context, head_dim)."""
    if path.exists():
        saved = torch.load(path)
        if saved["kv"][0][0].shape[2] >= context:
            return saved["kv"]
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with torch.no_grad():
        for part in ids.split(2048, 1):  # chunked: bounded attention transient
            model.model(input_ids=part, **with_cache(cache), use_cache=True)
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ids": ids, "kv": kv}, path)
    return kv


@contextmanager
def seeded_cache(model, method: str, budget: float, kv, context: int, room: int | None = None):
    """A cache holding what ``method`` keeps of the first ``context`` tokens of ``kv``; ``room``: the
    full cache as a static cache of that many slots (the engine's), else a DynamicCache."""
    if method == "full":
        cache = DynamicCache() if room is None else static_cache(model, room)
        for i, (k, v) in enumerate(kv):
            extra = {} if room is None else {"cache_position": torch.arange(context)}
            cache.update(k[:, :, :context].clone(), v[:, :, :context].clone(), i, extra)
        with nullcontext(cache):
            yield cache
        return
    policy = make_policy(method, budget, context)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    with attach(model, policy) as cache, torch.no_grad():
        for layer, (k, v) in zip(cache.layers, kv):
            k, v = k[:, :, :context].clone(), v[:, :, :context].clone()
            query = k[:, :, -1:].repeat_interleave(group, 1)  # stand-in query, (1, heads, 1, head_dim)
            if policy.needs_queries:
                layer.queries = query
            layer.update(k, v)
            if getattr(layer, "pending", False):  # a layer that stores through its attention (kvcache.fused)
                layer.attend(None, query, None, k.shape[-1] ** -0.5)
        yield cache


def decode_steps(model, cache, context: int, steps: int) -> list[float]:
    """Seconds per decode step, feeding each step's greedy token back."""
    token = torch.tensor([[model.config.bos_token_id or 1]])
    times = []
    with torch.no_grad():
        for i in range(steps):
            position = torch.tensor([[context + i]])
            start = time.perf_counter()
            logits = model(input_ids=token, **with_cache(cache), position_ids=position, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return times


def engine_steps(model, cache, context: int, steps: int) -> list[float]:
    """``decode_steps`` through leanlm's engine: the lean step where the cache allows it (a static cache,
    the quantized policy), else the model's forward; streaming bf16 linears either way."""
    enable_streaming_linears(model)
    state = DecodeState(cache, torch.tensor([context]), None, seen=context)
    step = lean_step(model, cache)
    token = torch.tensor([[model.config.bos_token_id or 1]])
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            logits = step(token, state) if step is not None else forward(model, token, state)[:, -1]
            token = logits.argmax(-1)[:, None]
            times.append(time.perf_counter() - start)
    return times


def kv_bytes_held(cache, tokens: int) -> int:
    """A static cache's K/V bytes for the ``tokens`` written (its preallocation is sized to the run)."""
    layer = cache.layers[0]
    per_token = layer.keys[0, :, 0].numel() * layer.keys.element_size() * 2
    return per_token * tokens * len(cache.layers)


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def speed(model, kv, args) -> dict:
    rows = {}
    for context in args.contexts:
        runs = {m: [] for m in args.methods}
        held = {}
        for _ in range(args.rounds):
            for method in args.methods:
                room = context + args.warmup + args.new_tokens if args.engine else None
                name, _, variant = method.partition(":")  # quantized:float32 = the kernel without int8 dot products
                with seeded_cache(model, name, args.budget, kv, context, room) as cache, \
                        kernels.use_int8_attention(variant != "float32"):
                    run = engine_steps if args.engine else decode_steps
                    run(model, cache, context, args.warmup)
                    times = run(model, cache, context + args.warmup, args.new_tokens)
                    runs[method].append(len(times) / sum(times))
                    held[method] = cache_bytes(cache) if room is None or name != "full" else \
                        kv_bytes_held(cache, context + args.warmup + args.new_tokens)
                print(context, method, f"{runs[method][-1]:.4g} tok/s", f"{held[method]} bytes", flush=True)
        base = statistics.median(runs["full"]) if "full" in runs else None
        rows[context] = {m: {"tokens_per_s": runs[m], "median_tokens_per_s": statistics.median(runs[m]),
                             "ratio_to_full": statistics.median(runs[m]) / base if base else None,
                             "cache_bytes": held[m], "bytes_ratio_to_full": held[m] / held["full"] if "full" in held else None}
                         for m in args.methods}
    return rows


class Timers:
    """Wraps functions so that each call adds its wall time to a named bucket (nesting is subtracted later)."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self.undo = []

    def wrap(self, owner, attr: str, bucket: str):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total[bucket] = self.total.get(bucket, 0.0) + time.perf_counter() - start

        setattr(owner, attr, timed)
        self.undo.append((owner, attr, original))

    def restore(self):
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)


def profile(model, kv, args) -> dict:
    """Per method and context: ms per step in each bucket (exclusive), medians over steps' sums."""
    from leanlm.kvcache import base, eviction, heavy_hitter, quantized
    try:  # absent before the fused kernels (profiling the old code)
        from leanlm.kvcache import fused_kernels, slots
    except ImportError:
        fused_kernels = slots = None
    from transformers import modeling_utils
    from transformers.cache_utils import DynamicLayer

    out = {}
    for context in args.contexts:
        for method in args.methods:
            timers = Timers()
            interface = modeling_utils.ALL_ATTENTION_FUNCTIONS
            for module in (quantized, eviction, heavy_hitter) + tuple(m for m in (slots,) if m):
                if hasattr(module, "dequantize"):
                    timers.wrap(module, "dequantize", "dequantize")
                if hasattr(module, "quantize"):
                    timers.wrap(module, "quantize", "quantize")
            timers.wrap(base.PolicyLayer, "update", "cache_update")
            timers.wrap(DynamicLayer, "update", "cache_update")
            for layer_cls in (quantized.KiviLayer, heavy_hitter.HeavyHitterLayer) + \
                    tuple(c for c in (getattr(heavy_hitter, "SlotHeavyHitterLayer", None),) if c):
                if "update" in vars(layer_cls):
                    timers.wrap(layer_cls, "update", "cache_update")
            timers.wrap(heavy_hitter.HeavyHitterLayer, "observe", "scoring")
            timers.wrap(heavy_hitter.HeavyHitterLayer, "keep", "scoring")
            timers.wrap(base, "capture_queries", "queries_hook")
            timers.wrap(eviction.FullStore, "select", "gather")
            timers.wrap(eviction.QuantStore, "select", "gather")
            if hasattr(heavy_hitter, "SlotHeavyHitterLayer"):
                timers.wrap(heavy_hitter.SlotHeavyHitterLayer, "_evict_and_write", "gather")
            if fused_kernels:
                timers.wrap(fused_kernels, "run", "attention_kernel")
            originals = {name: interface[name] for name in ("sdpa", "leanlm_kv") if name in interface}
            for name, fn in originals.items():
                interface._global_mapping[name] = (lambda fn: lambda *a, **k: _timed(timers, "attention", fn, *a, **k))(fn)
            try:
                with seeded_cache(model, method, args.budget, kv, context) as cache:
                    decode_steps(model, cache, context, args.warmup)
                    timers.total.clear()
                    steps = decode_steps(model, cache, context + args.warmup, args.new_tokens)
            finally:
                interface._global_mapping.update(originals)
                timers.restore()
            n = len(steps)
            ms = {k: 1e3 * v / n for k, v in timers.total.items()}
            parts = {"step_total": 1e3 * sum(steps) / n, "cache_update": ms.get("cache_update", 0.0),
                     "attention": ms.get("attention", 0.0), "queries_hook": ms.get("queries_hook", 0.0),
                     "of_which_dequantize": ms.get("dequantize", 0.0), "of_which_quantize": ms.get("quantize", 0.0),
                     "of_which_scoring": ms.get("scoring", 0.0), "of_which_gather_or_evict": ms.get("gather", 0.0),
                     "of_which_fused_kernel": ms.get("attention_kernel", 0.0)}
            parts["rest"] = parts["step_total"] - parts["cache_update"] - parts["attention"] - parts["queries_hook"]
            out.setdefault(context, {})[method] = parts
            print(context, method, {k: round(v, 2) for k, v in parts.items()}, flush=True)
    return out


def _timed(timers: Timers, bucket: str, fn, *args, **kwargs):
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timers.total[bucket] = timers.total.get(bucket, 0.0) + time.perf_counter() - start


def quality(model, args) -> dict:
    """Continuation protocol (evaluate/kv_protocols.py), quantized@budget with the continuation attended
    fused (all its tokens in one fused step) vs dequantize-then-attend, against the uncompressed run."""
    import dataclasses

    from leanlm.evaluate.kv_protocols import ContinuationProtocol, continuation_perplexity, continuation_reference
    from leanlm.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    protocol = ContinuationProtocol(split=args.quality_split, context=args.quality_context, continuation=128,
                                    windows=args.quality_windows)
    reference = continuation_reference(model, tokenizer, protocol)
    policy = make_policy("quantized", args.budget, protocol.context)
    out = {"protocol": dataclasses.asdict(protocol), "policy": policy.describe()}
    for name, fused in (("fused", True), ("dequantize_then_attend", False)):
        chosen = dataclasses.replace(policy, fused=fused, fused_queries=protocol.continuation)
        out[name] = continuation_perplexity(model, tokenizer, chosen, protocol, reference=reference).to_dict()
        out[name]["ppl_ratio"] = out[name]["perplexity"] / out[name]["reference_perplexity"]
        print(name, {k: out[name][k] for k in ("ppl_ratio", "perplexity", "kl", "top1_agreement")}, flush=True)
    out["reference"] = reference.result.to_dict()
    return out


def kernel_quality(model, args) -> dict:
    """The quantized cache's C++ decode kernel on real text, integer dot products vs float32: each window's
    context is prefilled into a ``quantized``@budget cache, then the continuation is decoded token by token
    (teacher-forced) through the lean step (the kernel); each step's distribution is compared with the
    uncompressed run's (one forward over the whole window): perplexity ratio, KL, top-1 agreement."""
    from leanlm.evaluate.kv.continuation import ContinuationProtocol, continuation_windows
    from leanlm.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    protocol = ContinuationProtocol(split=args.quality_split, context=args.quality_context, continuation=128,
                                    windows=args.quality_windows)
    policy = make_policy("quantized", args.budget, protocol.context)
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0} for name in ("reference", "int8", "float32")}
    count = 0
    for window in continuation_windows(tokenizer, protocol):
        ids = torch.tensor([window])
        context = protocol.context
        with torch.inference_mode():
            reference = model(input_ids=ids).logits[0, context - 1:-1].float().log_softmax(-1)  # predicts the continuation
        targets = ids[0, context:]
        sums["reference"]["nll"] -= reference.gather(-1, targets[:, None]).sum().item()
        for name, integer in (("int8", True), ("float32", False)):
            with attach(model, policy) as cache, torch.inference_mode(), kernels.use_int8_attention(integer):
                first = model(input_ids=ids[:, :context], **with_cache(cache), use_cache=True).logits[0, -1]
                state = DecodeState(cache, torch.tensor([context]), None, seen=context)
                step = lean_step(model, cache)
                if step is None:
                    raise LeanLMError("the quantized cache does not take the lean step here (no kernels?)")
                rows = [first]
                for token in targets[:-1]:
                    rows.append(step(token.view(1, 1), state)[0])
            logp = torch.stack(rows).float().log_softmax(-1)
            sums[name]["nll"] -= logp.gather(-1, targets[:, None]).sum().item()
            sums[name]["kl"] += (reference.exp() * (reference - logp)).sum().item()
            sums[name]["agree"] += (logp.argmax(-1) == reference.argmax(-1)).sum().item()
        count += len(targets)
        print("window done", {k: round(v["nll"] / count, 4) for k, v in sums.items()}, flush=True)
    ppl = {name: math.exp(v["nll"] / count) for name, v in sums.items()}
    out = {"protocol": {**dataclasses.asdict(protocol), "decode": "token by token through the lean step"},
           "policy": policy.describe(), "tokens": count, "reference_perplexity": ppl["reference"]}
    for name in ("int8", "float32"):
        out[name] = {"perplexity": ppl[name], "ppl_ratio": ppl[name] / ppl["reference"], "kl": sums[name]["kl"] / count,
                     "top1_agreement": sums[name]["agree"] / count}
        print(name, out[name], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (never overwritten)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=list(METHODS),
                        help="policies (make_policy names); quantized:float32 = its kernel without int8 dot products")
    parser.add_argument("--budget", type=float, default=0.25, help="KV budget of the policies (fraction of full bytes)")
    parser.add_argument("--new-tokens", type=int, default=32, help="timed decode steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps before each timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed-file", type=Path, default=Path("runs/kv_prefill_16k.pt"))
    parser.add_argument("--profile", action="store_true", help="break the decode step into parts instead")
    parser.add_argument("--engine", action="store_true",
                        help="decode through leanlm's engine (lean step: full = static cache, quantized = its kernel)")
    parser.add_argument("--quality", action="store_true", help="continuation perplexity ratio instead (fused vs not)")
    parser.add_argument("--quality-context", type=int, default=2048)
    parser.add_argument("--quality-windows", type=int, default=2)
    parser.add_argument("--quality-split", default="test", help="WikiText-2 split of --quality / --kernel-quality")
    parser.add_argument("--kernel-quality", action="store_true",
                        help="the quantized cache's decode kernel on real text, int8 dot products vs float32")
    args = parser.parse_args()
    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
    torch.set_num_threads(args.threads)
    model = load_model("smollm2-135m", "bfloat16")
    if args.kernel_quality:
        result = kernel_quality(model, args)
    elif args.quality:
        result = quality(model, args)
    else:
        kv = prefill_kv(model, max(args.contexts), args.seed_file)
        result = profile(model, kv, args) if args.profile else speed(model, kv, args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    atomic_write_json(args.out, {"settings": settings, "result": result, "note": "shared machine: compare ratios only",
                                 "versions": versions(), "git": git_info()})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LeanLMError as err:
        print(f"kv_decode_speed: error: {err}", file=sys.stderr)
        sys.exit(2)
