"""Benchmark: MLA-style latent KV (``transforms/latent_kv``) on SmolLM2-135M, before and after recovery.

    OMP_NUM_THREADS=1 LEANLM_DATA_DIR=../shared/data PYTHONPATH=src \\
        .venv/bin/python benchmarks/latent_kv.py --out runs/latent/latent_kv.json

For each KV fraction (default 1/2, 1/4, 1/8 of the bf16 cache) one process (bf16 model, one thread by
default, CPU time counted with ``time.process_time``):
- converts a copy of the original (calibration: random WikiText-2 *validation* windows);
- measures the cache bytes per token from a real ``LatentCache`` after prefilling ``--bytes-context``
  tokens of WikiText-2 test, beside the original's ``DynamicCache`` after the same prefill;
- scores perplexity, KL to the original and top-1 agreement on the first ``--eval-tokens`` tokens of
  WikiText-2 test and of Botchan (out of domain; non-overlapping windows of ``--eval-window``):
  stage ``none`` (conversion only), ``layer_local`` (each latent layer's new projections fitted by
  Adam to the original attention's outputs on captured validation activations, ``recover/layer_local``),
  and, for ``--distill-fractions``, ``distill`` (LoRA on attention + MLP and on the latent
  projections, KD from the original on validation windows, stopped by ``--distill-cpu-minutes``);
- decode speed at ``--speed-context`` tokens through the engine (``leanlm.engine.stream``): the
  original (DynamicCache), the latent model (absorbed decode) and the latent model re-expanding K/V
  every step, alternated over rounds from one prefill each (cropped back after every round), medians
  and ratios. The machine is shared: only these side-by-side ratios mean anything.
Rows use ``benchmarks/kv_pareto.py``'s schema (method, source, budget, bytes_per_token, ppl, ppl_ratio,
kl, top1_agreement, ...) plus the stage, the out-of-domain fields and the training CPU minutes and
tokens. The JSON is rewritten after every stage, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from leanlm.data import calibration_batches, tokenize_split
from leanlm.data.ood import SOURCE as OOD_SOURCE
from leanlm.data.ood import ood_text
from leanlm.engine.decode import DecodeState, forward
from leanlm.evaluate.side_by_side import alternate, median_ratio
from leanlm.kvcache.latent import latent_cache
from leanlm.models import load_model, load_tokenizer
from leanlm.models.compat import with_cache
from leanlm.models.latent_attention import latent_layers
from leanlm.recover import DistillConfig, distill
from leanlm.recover.layer_local import LocalFitConfig, capture_attention_io, fit_module
from leanlm.recover.lora import LoraSettings, add_lora, merge_lora
from leanlm.recover.windows import training_windows
from leanlm.report import atomic_write_json, git_info, versions
from leanlm.transforms.latent_kv import convert

LATENT_PARAMS = ("kv_down", "k_up", "v_up", "k_rope")


def eval_ids(tokenizer, split: str, tokens: int) -> torch.Tensor:
    if split == "botchan":
        return torch.tensor(tokenizer(ood_text(), add_special_tokens=False, verbose=False)["input_ids"][:tokens])
    return tokenize_split(tokenizer, split, "paper")[:tokens]


@torch.inference_mode()
def score(model, windows: torch.Tensor, reference: list[torch.Tensor] | None = None) -> tuple[dict, list[torch.Tensor]]:
    """Perplexity over (num_windows, window) ids; KL(original ‖ model) and top-1 agreement against ``reference``."""
    nll = kl = agree = count = 0.0
    logprobs = []
    for i, window in enumerate(windows):
        logits = model(window[None], use_cache=False).logits[0, :-1].float()  # (window - 1, vocab)
        lp = logits.log_softmax(-1)
        nll += float(F.nll_loss(lp, window[1:], reduction="sum"))
        count += lp.shape[0]
        if reference is not None:
            ref = reference[i].float()
            kl += float((ref.exp() * (ref - lp)).sum())
            agree += float((ref.argmax(-1) == lp.argmax(-1)).sum())
        logprobs.append(lp.to(torch.bfloat16))
    out = {"ppl": float(torch.tensor(nll / count).exp()), "tokens_scored": int(count)}
    if reference is not None:
        out |= {"kl": kl / count, "top1_agreement": agree / count}
    return out, logprobs


@torch.inference_mode()
def cache_bytes_per_token(model, ids: torch.Tensor, latent: bool) -> dict:
    """Prefill ``ids`` (tokens,) in chunks of 512 and count the bytes the cache holds, per token."""
    cache = latent_cache(model) if latent else DynamicCache()
    for part in ids[None].split(512, dim=1):
        model(part, **with_cache(cache), use_cache=True, logits_to_keep=1)
    held = [t for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    walked = sum(t.numel() * t.element_size() for t in held)
    if latent:
        assert walked == cache.nbytes(), "LatentCache.nbytes() disagrees with the tensors it holds"
    return {"bytes_per_token": walked / ids.numel(), "tokens": ids.numel(), "cache": type(cache).__name__}


def layer_local(model, teacher, tokenizer, args) -> dict:
    """Fit every latent layer's new projections to the original attention outputs (one layer at a time)."""
    began = time.process_time()
    windows = training_windows(tokenizer, args.local_len, limit=args.local_windows)
    config = LocalFitConfig(steps=args.local_steps, lr=args.local_lr, batch_calls=2, heldout_fraction=0.25)
    layers = [i for i, _ in latent_layers(model)]
    per_layer = []
    for start in range(0, len(layers), 10):  # 10 layers' activations at a time bounds the memory
        chunk = layers[start:start + 10]
        io = capture_attention_io(teacher, windows, chunk, batch_size=2)
        for i in chunk:
            module = model.model.layers[i].self_attn
            params = [p for n, p in module.named_parameters() if n.split(".")[0] in LATENT_PARAMS]
            result = fit_module(module, io[i], config, params=params)
            per_layer.append({"layer": i, "before": result.before, "after": result.after,
                              "heldout_before": result.heldout_before, "heldout_after": result.heldout_after})
        del io
    return {"train_cpu_minutes": (time.process_time() - began) / 60, "train_tokens": windows.numel(),
            "local_fit": {"steps": args.local_steps, "lr": args.local_lr, "windows": windows.shape[0],
                          "seq_len": args.local_len, "per_layer": per_layer}}


def lora_distill(model, teacher, tokenizer, args, out_dir: Path):
    """LoRA + KD from the original, stopped by the CPU budget; returns (merged model, stats)."""
    began = time.process_time()
    windows = training_windows(tokenizer, args.distill_len)
    targets = ("q_proj", "o_proj", *LATENT_PARAMS)
    student = add_lora(model, LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=targets,
                                           include_mlp=True))
    config = DistillConfig(steps=args.distill_steps, batch_size=args.distill_batch, seq_len=args.distill_len,
                           lr=args.distill_lr, warmup_steps=5, checkpoint_every=0, bf16=False,
                           max_cpu_minutes=args.distill_cpu_minutes)
    result = distill(student, teacher, windows, config, out_dir=out_dir)
    merged = merge_lora(student).eval()
    return merged, {"train_cpu_minutes": (time.process_time() - began) / 60,
                    "train_tokens": result.steps_done * result.tokens_per_step,
                    "distill": {"steps_done": result.steps_done, "lora_rank": args.lora_rank, "targets": list(targets),
                                "include_mlp": True, "batch": args.distill_batch, "seq_len": args.distill_len,
                                "lr": args.distill_lr, "final_loss": result.losses[-1] if result.losses else None}}


def decode_rate(model, prompt: torch.Tensor, cache, tokens: int) -> float:
    """Tokens/s of ``tokens`` greedy engine steps from a ``cache`` prefilled with all but the prompt's last
    token (that token is fed first, at its own position); the cache is cropped back after."""
    held = prompt.shape[1] - 1
    state = DecodeState(cache, torch.tensor([held]), None, seen=held)
    token = prompt[:, -1:]
    start = time.perf_counter()
    for _ in range(tokens):
        token = forward(model, token, state)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    seconds = time.perf_counter() - start
    for layer in cache.layers:
        layer.crop(-tokens)
    return tokens / seconds


@torch.inference_mode()
def side_by_side_speed(base, latent, ids: torch.Tensor, args) -> dict:
    """Original vs latent (absorbed) vs latent re-expanding every step, alternated, from one prefill each."""
    prompt = ids[None, : args.speed_context]
    shared = latent_cache(latent)  # both latent runs decode from one prefill (cropped back after each round)
    caches = {"original": DynamicCache(), "latent": shared, "latent_expanded": shared}
    models = {"original": base, "latent": latent, "latent_expanded": latent}
    for name in ("original", "latent"):
        for part in prompt[:, :-1].split(512, dim=1):
            models[name](part, **with_cache(caches[name]), use_cache=True, logits_to_keep=1)

    def run(name):
        for _, module in latent_layers(models[name]):
            module.absorb = "never" if name == "latent_expanded" else "auto"
        return decode_rate(models[name], prompt, caches[name], args.speed_tokens)

    runs = alternate({name: (lambda name=name: run(name)) for name in caches}, args.speed_rounds)
    for _, module in latent_layers(latent):
        module.absorb = "auto"
    return {"context": args.speed_context, "new_tokens": args.speed_tokens, "rounds": args.speed_rounds,
            "threads": torch.get_num_threads(), "runs_tokens_per_s": runs,
            "latent_vs_original": median_ratio(runs["original"], runs["latent"]),
            "expanded_vs_original": median_ratio(runs["original"], runs["latent_expanded"]),
            "latent_cache_bytes": caches["latent"].nbytes(),
            "note": "shared machine: only these alternated ratios mean anything"}


def evaluate_stage(model, refs: dict) -> dict:
    """Test and Botchan scores of ``model``, as row fields (ratios to the original's)."""
    base_scores = refs["scores"]
    test, _ = score(model, refs["test"], refs["test_logprobs"])
    ood, _ = score(model, refs["botchan"], refs["botchan_logprobs"])
    return {"ppl": test["ppl"], "ppl_ratio": test["ppl"] / base_scores["test"]["ppl"], "kl": test["kl"],
            "top1_agreement": test["top1_agreement"], "ood_ppl": ood["ppl"],
            "ood_ppl_ratio": ood["ppl"] / base_scores["botchan"]["ppl"], "ood_kl": ood["kl"],
            "ood_top1_agreement": ood["top1_agreement"]}


def make_row(fraction: float, stage: str, cache: dict, conversion: dict, scores: dict, training: dict) -> dict:
    return {"method": "latent_kv", "source": "leanlm", "budget": fraction, "stage": stage,
            "bytes_per_token": cache["bytes_per_token"], "total_bytes_per_token": cache["bytes_per_token"],
            "peak_bytes": None, **scores, "train_cpu_minutes": training.get("train_cpu_minutes", 0.0),
            "train_tokens": training.get("train_tokens", 0), "conversion": conversion,
            **{k: v for k, v in training.items() if k not in ("train_cpu_minutes", "train_tokens")}}


def references(base, tokenizer, args) -> tuple[dict, dict]:
    refs, scores = {}, {}
    for split in ("test", "botchan"):
        ids = eval_ids(tokenizer, split, args.eval_tokens)
        count = len(ids) // args.eval_window
        refs[split] = ids[: count * args.eval_window].view(count, args.eval_window)  # (windows, window)
        scores[split], refs[f"{split}_logprobs"] = score(base, refs[split])
    return refs, scores


def run_fraction(fraction: float, base, tokenizer, calibration, refs, result, args, out: Path) -> None:
    rows = result["rows"]
    began = time.process_time()
    model = copy.deepcopy(base)
    conversion = convert(model, calibration, args.rope_pairs[fraction], kv_fraction=fraction, allocation=args.allocation,
                         weighting=args.weighting, pair_criterion=args.pair_criterion)
    conversion["cpu_minutes"] = (time.process_time() - began) / 60
    cache = cache_bytes_per_token(model, refs["bytes_ids"], latent=True)
    conversion["bytes_reduction"] = result["baseline"]["bytes_per_token"] / cache["bytes_per_token"]
    rows.append(make_row(fraction, "none", cache, conversion, evaluate_stage(model, refs), {}))
    save(result, out)
    if args.local_steps > 0 and (args.local_fractions is None or fraction in args.local_fractions):
        training = layer_local(model, base, tokenizer, args)
        rows.append(make_row(fraction, "layer_local", cache, conversion,
                             evaluate_stage(model, refs), training))
        save(result, out)
    if fraction in args.distill_fractions:
        model, distilled = lora_distill(model, base, tokenizer, args, out.parent / f"distill-{fraction}")
        spent = rows[-1].get("train_cpu_minutes", 0.0)
        distilled["train_cpu_minutes"] += spent  # the layer-local fit it started from counts too
        distilled["train_tokens"] += rows[-1].get("train_tokens", 0)
        rows.append(make_row(fraction, "distill", cache, conversion, evaluate_stage(model, refs),
                             distilled))
        save(result, out)
    if fraction == args.speed_fraction and args.speed_context > 0:
        ids = eval_ids(tokenizer, "test", args.speed_context)
        result["speed"] = side_by_side_speed(base, model, ids, args) | {"fraction": fraction}
        save(result, out)


def save(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="JSON file to write (rewritten after every stage)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--fractions", default="0.5,0.25,0.125", help="KV fractions of the bf16 cache to convert to")
    p.add_argument("--rope-pairs", default="0.5=8,0.25=8,0.125=4",
                   help="frequency pairs per KV head kept with RoPE, per fraction (FRACTION=PAIRS,...)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "spectrum"))
    p.add_argument("--weighting", default="none", choices=("none", "qo"))
    p.add_argument("--pair-criterion", default="attention", choices=("attention", "norm"))
    p.add_argument("--calibration-samples", type=int, default=32)
    p.add_argument("--calibration-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096, help="first N tokens of WikiText-2 test and of Botchan")
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--bytes-context", type=int, default=2048, help="prefill length the cache bytes are measured after")
    p.add_argument("--local-steps", type=int, default=100, help="Adam steps per layer of the layer-local fit; 0 = skip")
    p.add_argument("--local-lr", type=float, default=1e-3)
    p.add_argument("--local-fractions", default=None, help="fractions that get the layer-local fit (default: all)")
    p.add_argument("--local-windows", type=int, default=16)
    p.add_argument("--local-len", type=int, default=256)
    p.add_argument("--distill-fractions", default="0.25", help="fractions that also get LoRA + KD ('' = none)")
    p.add_argument("--distill-cpu-minutes", type=float, default=5.0)
    p.add_argument("--distill-steps", type=int, default=1000, help="upper bound; the CPU budget stops it first")
    p.add_argument("--distill-batch", type=int, default=2)
    p.add_argument("--distill-len", type=int, default=256)
    p.add_argument("--distill-lr", type=float, default=5e-4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--speed-fraction", type=float, default=0.25)
    p.add_argument("--speed-context", type=int, default=4096, help="0 = skip the speed comparison")
    p.add_argument("--speed-tokens", type=int, default=16)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args()
    args.fractions = [float(x) for x in args.fractions.split(",") if x]
    args.distill_fractions = [float(x) for x in args.distill_fractions.split(",") if x]
    if args.local_fractions is not None:
        args.local_fractions = [float(x) for x in args.local_fractions.split(",") if x]
    args.rope_pairs = {float(k): int(v) for k, v in (item.split("=") for item in args.rope_pairs.split(",") if item)}
    missing = [f for f in args.fractions if f not in args.rope_pairs]
    if missing:
        p.error(f"--rope-pairs gives no pair count for fractions {missing}")
    return args


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, base = load_tokenizer(args.model), load_model(args.model, dtype="bfloat16")
    calibration = calibration_batches(tokenizer, args.calibration_samples, args.calibration_len, batch_size=4)
    refs, base_scores = references(base, tokenizer, args)
    refs["scores"] = base_scores
    refs["bytes_ids"] = eval_ids(tokenizer, "test", args.bytes_context)
    baseline = cache_bytes_per_token(base, refs["bytes_ids"], latent=False)
    baseline |= {"ppl": base_scores["test"]["ppl"], "ood_ppl": base_scores["botchan"]["ppl"], "dtype": "bfloat16"}
    result = {"benchmark": "latent_kv", "model": args.model,
              "args": {k: (str(v) if isinstance(v, (Path, dict)) else v) for k, v in vars(args).items()},
              "protocol": {"test": "WikiText-2 test, 'paper' join", "ood": f"Botchan ({OOD_SOURCE})",
                           "tokens": args.eval_tokens, "window": args.eval_window, "method": "nonoverlap",
                           "windows": int(refs["test"].shape[0]), "dtype": "bfloat16",
                           "calibration": f"{args.calibration_samples} x {args.calibration_len} WikiText-2 validation",
                           "training": "WikiText-2 validation", "cpu_time": "time.process_time()"},
              "baseline": baseline, "rows": [], "git": git_info(), "versions": versions()}
    for fraction in args.fractions:
        run_fraction(fraction, base, tokenizer, calibration, refs, result, args, args.out)
    save(result, args.out)
    for r in result["rows"]:
        print(f"latent_kv@{r['budget']} {r['stage']:>11}: {r['bytes_per_token']:.0f} B/token, ppl ratio "
              f"{r['ppl_ratio']:.4f}, ood {r['ood_ppl_ratio']:.4f}, {r['train_cpu_minutes']:.1f} CPU-min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
