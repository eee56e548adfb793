"""Run NVIDIA kvpress presses on the same model, tokens and protocol as leanlm's KV-cache policies.

Runs in its own venv (kvpress pins an older transformers), so it must not import leanlm:

    bash benchmarks/kvpress_env.sh
    .venv-kvpress/bin/python benchmarks/kvpress_driver.py --request REQ.json --out OUT.json
    .venv-kvpress/bin/python benchmarks/kvpress_driver.py --smoke --out OUT.json   # tiny self-made request

Protocol ("context compression"), per window = context + continuation:
  1. prefill the context in ONE forward with the press active (kvpress compresses each layer's
     cache right after that layer's attention, so the prefill's own logits are uncompressed);
  2. teacher-force the continuation in one forward on the compressed cache, no press, with
     position_ids = the tokens' original positions;
  3. score NLL of every continuation token (the first predicted from the prefill's last logits)
     and KL(p_full || p_compressed), p_full from the same computation with no press.
budget = fraction of the baseline cache bytes kept: eviction presses get compression_ratio = 1 - budget,
the quantized cache gets nbits = 16 * budget (bf16 baseline). budget 1.0 = no press: its rows are the
baseline's numbers under the press's name, not a rerun.

Request keys: model, dtype, presses, budgets, windows, continuation, passkey, passkey_budgets,
decode_tokens; optional threads, quantized (overrides of QUANT_DEFAULTS).
Output: {kvpress_version, transformers_version, torch_version, attn_implementation, dtype, model,
n_windows, continuation, threads, windows_sha256 (of the token ids scored), baseline: ROW, rows: [ROW, ...]}
with ROW = {method ("full" or
"kvpress:<press>"), source "kvpress", budget, bytes_per_token (measured after prefill / context tokens),
nll, ppl, kl, passkey {length: accuracy} | null, passkey_loglik {length: mean} | null,
decode_tokens_per_s, seconds, seconds_per_window, error (null or "Type: first line")}; quantized rows
also carry quant {backend, axis_key, axis_value, q_group_size, residual_length, nbits}.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ATTN_IMPLEMENTATION = "eager"  # ObservedAttentionPress needs the attention weights; eager for every row keeps them comparable
QUANT_DEFAULTS = {"backend": "hqq", "axis_key": 1, "axis_value": 1, "q_group_size": 64, "residual_length": 128}
PRESS_CLASSES = {
    "streaming_llm": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "expected_attention": "ExpectedAttentionPress",
    "observed_attention": "ObservedAttentionPress",
}


# ---------------------------------------------------------------- caches and presses


def make_cache(model, press_name: str, budget: float, quant: dict):
    """A fresh cache for one prefill: DynamicCache, or a QuantizedCache whose bits follow the budget."""
    from transformers import DynamicCache, QuantizedCache

    if press_name != "quantized" or budget >= 1.0:
        return DynamicCache(config=model.config)
    bits = 16 * budget
    if bits != int(bits):
        raise ValueError(f"budget {budget} is not a whole number of bits of bf16 ({bits})")
    q = {**QUANT_DEFAULTS, **quant}
    return QuantizedCache(q.pop("backend"), model.config, nbits=int(bits), **q)


def make_press(press_name: str, budget: float):
    """The kvpress press for this budget, or None (no press: baseline, budget 1.0, or the quantized cache)."""
    if press_name == "quantized" or budget >= 1.0:
        return None
    import kvpress

    if press_name not in PRESS_CLASSES:
        raise ValueError(f"unknown press {press_name!r}; known: {sorted(PRESS_CLASSES) + ['quantized']}")
    return getattr(kvpress, PRESS_CLASSES[press_name])(compression_ratio=1.0 - budget)


def tensor_nbytes(obj) -> int:
    """Bytes of every tensor in obj: plain tensors, quanto's packed subclasses, HQQ's (data, meta) tuples."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
            names, _ = obj.__tensor_flatten__()  # quanto: _data (packed), _scale, _shift
            return sum(tensor_nbytes(getattr(obj, n)) for n in names)
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_nbytes(v) for v in obj)
    return 0


def cache_nbytes(cache) -> int:
    """Measured bytes the cache holds: every tensor attribute of every layer (K/V, packed data, scales)."""
    return sum(tensor_nbytes(v) for layer in cache.layers for v in vars(layer).values())


# ---------------------------------------------------------------- forwards


def prefill(model, ids: list[int], press, cache):
    """One forward over ids with the press active; returns the last position's logits (float32)."""
    x = torch.tensor([ids])
    if press is None:
        out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    else:
        with press(model):
            out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float()


def extend(model, cache, ids: list[int], start: int, logits_to_keep: int = 0):
    """Feed ids at original positions start.. on the (compressed) cache; returns float32 logits (n, vocab)."""
    x = torch.tensor([ids])
    pos = torch.arange(start, start + len(ids)).unsqueeze(0)
    out = model(input_ids=x, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=logits_to_keep)
    return out.logits[0].float()


def continuation_logprobs(model, cache, last_logits, cont: list[int], start: int):
    """Log-probs predicting each continuation token: the prefill's last logits, then the teacher-forced ones."""
    rest = extend(model, cache, cont[:-1], start) if len(cont) > 1 else last_logits[None][:0]
    return F.log_softmax(torch.cat([last_logits[None], rest]), dim=-1)


def greedy(model, cache, last_logits, start: int, n: int) -> tuple[list[int], list[float]]:
    """Greedy-generate n tokens one at a time; returns the tokens and each step's wall time."""
    tokens, times, logits = [], [], last_logits
    for i in range(n):
        tok = int(logits.argmax())
        tokens.append(tok)
        if i == n - 1:
            break
        t0 = time.perf_counter()
        logits = extend(model, cache, [tok], start + i, logits_to_keep=1)[-1]
        times.append(time.perf_counter() - t0)
    return tokens, times


# ---------------------------------------------------------------- one (method, budget) configuration


def windows_digest(windows) -> str:
    """sha256 of the token ids of every window scored, in order (the same digest as kv_pareto.windows_digest)."""
    return hashlib.sha256(json.dumps([[int(t) for t in w] for w in windows]).encode()).hexdigest()


def score_windows(model, windows, n_cont, press_name, budget, quant, refs, bar):
    """NLL / KL / bytes per token over all windows; refs (list) is filled when None entries are given."""
    nll_sum = kl_sum = 0.0
    n_tok, bytes_per_tok, first = 0, [], None
    for w, window in enumerate(windows):
        ctx, cont = window[:-n_cont], window[-n_cont:]
        cache = make_cache(model, press_name, budget, quant)
        last = prefill(model, ctx, make_press(press_name, budget), cache)
        bytes_per_tok.append(cache_nbytes(cache) / len(ctx))
        if w == 0:
            first = (copy.deepcopy(cache), last, len(ctx))  # for the decode-speed run
        logp = continuation_logprobs(model, cache, last, cont, len(ctx))
        if refs[w] is None:
            refs[w] = logp
        ref = refs[w]
        nll_sum += -logp.gather(1, torch.tensor(cont)[:, None]).sum().item()
        kl_sum += (ref.exp() * (ref - logp)).sum().item()
        n_tok += len(cont)
        bar.update(1)
    nll = nll_sum / n_tok
    return {"nll": nll, "ppl": math.exp(nll), "kl": kl_sum / n_tok,
            "bytes_per_token": sum(bytes_per_tok) / len(bytes_per_tok)}, first


def decode_speed(model, first, n_tokens: int, warmup: int = 2) -> float:
    """Tokens/s of greedy one-token steps on the compressed cache of the first window (after warm-up steps)."""
    cache, last, start = first
    _, times = greedy(model, cache, last, start, warmup + n_tokens + 1)
    timed = times[warmup:]
    return len(timed) / sum(timed)


def run_passkey(model, items, press_name, budget, quant, bar):
    """Exact-match accuracy (greedy) and mean answer log-likelihood (teacher forcing), each by length."""
    hits, logliks = {}, {}
    for item in items:
        ids, answer, length = item["ids"], item["answer"], str(item["length"])
        cache = make_cache(model, press_name, budget, quant)
        last = prefill(model, ids, make_press(press_name, budget), cache)
        tokens, _ = greedy(model, copy.deepcopy(cache), last, len(ids), len(answer))
        logp = continuation_logprobs(model, cache, last, answer, len(ids))
        hits.setdefault(length, []).append(float(tokens == answer))
        logliks.setdefault(length, []).append(logp.gather(1, torch.tensor(answer)[:, None]).sum().item())
        bar.update(1)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {k: mean(v) for k, v in hits.items()}, {k: mean(v) for k, v in logliks.items()}


def run_config(model, req, press_name, budget, refs, bar) -> dict:
    """One row. A failure becomes the row's error (exception type + first message line), never a crash."""
    method = "full" if press_name is None else f"kvpress:{press_name}"
    row = {"method": method, "source": "kvpress", "budget": budget, "bytes_per_token": None, "nll": None,
           "ppl": None, "kl": None, "passkey": None, "passkey_loglik": None, "decode_tokens_per_s": None,
           "seconds": None, "seconds_per_window": None, "error": None}
    if press_name == "quantized" and budget < 1.0:
        q = {**QUANT_DEFAULTS, **req.get("quantized", {})}
        row["quant"] = {**q, "nbits": 16 * budget}
    t0 = time.perf_counter()
    quant = req.get("quantized", {})
    try:
        with torch.inference_mode():
            metrics, first = score_windows(model, req["windows"], req["continuation"], press_name, budget,
                                           quant, refs, bar)
            row.update(metrics)
            row["seconds_per_window"] = (time.perf_counter() - t0) / len(req["windows"])
            row["decode_tokens_per_s"] = decode_speed(model, first, req.get("decode_tokens", 32))
            if req.get("passkey") and (press_name is None or budget in req.get("passkey_budgets", [])):
                row["passkey"], row["passkey_loglik"] = run_passkey(model, req.get("passkey", []), press_name,
                                                                    budget, quant, bar)
    except Exception as e:  # noqa: BLE001 - a press that fails on this stack is a result, not a crash
        msg = str(e).strip().splitlines()
        row["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}".strip()
    row["seconds"] = time.perf_counter() - t0
    return row


# ---------------------------------------------------------------- request, model, main


def load_model(path: str, dtype: str, attn_implementation: str = ATTN_IMPLEMENTATION):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                 attn_implementation=attn_implementation)
    return model.eval()


def smoke_request(model_path: str, data: Path) -> dict:
    """A tiny request: 2 WikiText-2 test windows of 512+64 tokens, one ~1024-token passkey, budgets 1.0 and 0.25."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(data.read_text())["input_ids"]
    step = len(ids) // 2  # two windows far apart: the file's first lines alone are unusually predictable
    windows = [ids[i * step:i * step + 576] for i in range(2)]
    filler = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    needle = " The pass key is 71432. Remember it. 71432 is the pass key."
    f_ids, n_ids = tok(filler)["input_ids"], tok(needle)["input_ids"]
    body = (f_ids * (1024 // len(f_ids) + 1))[:1024 - len(n_ids) - 16]
    depth = len(body) // 2
    prompt = body[:depth] + n_ids + body[depth:] + tok(" What is the pass key? The pass key is")["input_ids"]
    passkey = [{"ids": prompt, "answer": tok(" 71432")["input_ids"], "length": 1024, "depth": 0.5}]
    return {"model": model_path, "dtype": "bfloat16", "presses": ["streaming_llm", "snapkv", "knorm",
            "expected_attention", "observed_attention", "quantized"], "budgets": [1.0, 0.25],
            "windows": windows, "continuation": 64, "passkey": passkey, "passkey_budgets": [0.25],
            "decode_tokens": 32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--request", type=Path, help="request JSON (see module docstring / benchmark)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="build a tiny request from WikiText-2 instead")
    p.add_argument("--model", default=str(Path.home() / ".cache/leanlm/smollm2-135m"), help="for --smoke")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/wikitext-2-raw/wiki.test.raw")
    args = p.parse_args(argv)
    if args.smoke:
        req = smoke_request(args.model, args.data)
        if args.request:
            args.request.write_text(json.dumps(req))
    elif args.request:
        req = json.loads(args.request.read_text())
    else:
        p.error("give --request or --smoke")

    import kvpress  # noqa: F401 - importing patches transformers' attention functions, before any forward
    import transformers
    from importlib.metadata import version

    if req.get("threads"):  # optional: match the thread count leanlm's own runs use
        torch.set_num_threads(int(req["threads"]))
    attn = req.get("attn_implementation", ATTN_IMPLEMENTATION)  # "sdpa" is several times faster on CPU
    model = load_model(req["model"], req.get("dtype", "bfloat16"), attn)
    budgets = [b for b in req["budgets"] if b < 1.0]
    n_pass = len(req.get("passkey", []))
    n_pk_budgets = len([b for b in budgets if b in req.get("passkey_budgets", [])])
    total = (1 + len(req["presses"]) * len(budgets)) * len(req["windows"]) + n_pass * (1 + len(req["presses"]) * n_pk_budgets)
    refs = [None] * len(req["windows"])
    with tqdm(total=total, file=sys.stderr, desc="kvpress") as bar:
        bar.set_postfix_str("full")
        baseline = run_config(model, req, None, 1.0, refs, bar)
        if baseline["error"]:
            raise SystemExit(f"baseline failed: {baseline['error']}")
        rows = []
        for press_name in req["presses"]:
            if 1.0 in req["budgets"]:  # budget 1.0 = no press: the baseline computation itself
                rows.append({**baseline, "method": f"kvpress:{press_name}"})
            for budget in budgets:
                bar.set_postfix_str(f"{press_name}@{budget}")
                rows.append(run_config(model, req, press_name, budget, refs, bar))
    result = {"kvpress_version": version("kvpress"), "transformers_version": transformers.__version__,
              "torch_version": torch.__version__, "attn_implementation": attn,
              "dtype": req.get("dtype", "bfloat16"), "model": req["model"], "n_windows": len(req["windows"]),
              "continuation": req["continuation"], "threads": torch.get_num_threads(),
              "rows": rows, "baseline": baseline, "windows_sha256": windows_digest(req["windows"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
