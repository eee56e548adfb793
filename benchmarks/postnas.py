"""Benchmark: PostNAS on SmolLM2-135M — search which attention layers to swap, recover, measure.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/postnas.py --out runs/postnas/postnas.json

1. search (``leanlm.analyze.swap_search``) on WikiText-2 *validation*: per-layer sensitivity of each
   candidate (``--options``), then the ``--count`` least sensitive layers; the recipe is written;
2. the same count swapped uniformly (every other layer, each with the option the search chose for it);
3. recovery of layers with new parameters (layer-local fit, then KD of the new parameters only,
   ``--kd-cpu-minutes`` of process CPU time each);
4. rows in ``benchmarks/kv_rows.py``'s schema (its ``row``): continuation perplexity ratio and KL to
   the original on WikiText-2 test and on Botchan (``split: botchan``, out of domain), passkey at
   ``--passkey-lengths`` normalised to the original's, cache bytes measured from the cache at
   ``--byte-contexts``, decode tokens/s at the longest context alternated with the original's through
   the engine's default path (the prefilled cache copied to a static cache, sliding-window layers as
   rings of sink + window slots, and the lean step; medians, ratio: only the ratio means anything). Contexts past the model's 8,192 positions are used for bytes and speed only (RoPE
   extrapolates; quality there is not claimed).
Writes FILE.json, FILE.md and FILE-bytes.png / FILE-sensitivity.png; partial results after every stage.
"""

from __future__ import annotations

import argparse
import os
import copy
import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_rows import row  # noqa: E402  (the shared row schema)

from leanlm.analyze.swap_search import Passkey, SearchConfig, apply_choice, recipe_items, search  # noqa: E402
from leanlm.data import calibration_batches  # noqa: E402
from leanlm.data.ood import ood_text  # noqa: E402
from leanlm.data.wikitext import wikitext_text  # noqa: E402
from leanlm.data.windows import tokenize_split  # noqa: E402
from leanlm.engine.decode import forward, prefill, start_state  # noqa: E402
from leanlm.engine.lean_step import lean_step  # noqa: E402
from leanlm.engine.static_cache import static_copy  # noqa: E402
from leanlm.engine.streaming_linear import enable_streaming_linears  # noqa: E402
from leanlm.errors import LeanLMError  # noqa: E402
from leanlm.evaluate.kv import PasskeyProtocol, normalise, passkey_eval, passkey_prompts  # noqa: E402
from leanlm.evaluate.kv.passkey import PASSKEY_INTRO, PASSKEY_QUESTION, PASSKEY_SENTENCE, _answer_ids  # noqa: E402
from leanlm.evaluate.side_by_side import alternate, median_ratio  # noqa: E402
from leanlm.kvcache.swapped import swapped_nbytes  # noqa: E402
from leanlm.models import load_model, load_tokenizer  # noqa: E402
from leanlm.models.compat import with_cache  # noqa: E402
from leanlm.recover.config import DistillConfig  # noqa: E402
from leanlm.recover.swap import SwapRecoverConfig, recover_swapped  # noqa: E402
from leanlm.recover.windows import training_windows  # noqa: E402
from leanlm.report import atomic_write_json, git_info, versions  # noqa: E402
from transformers import DynamicCache  # noqa: E402


def validation_passkey(tok, length: int, depth: float, seed: int) -> Passkey:
    """A passkey prompt on WikiText-2 *validation* filler (the search never sees test text)."""
    key = str(random.Random(seed).randint(10000, 99999))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, sentence, question = enc(PASSKEY_INTRO), enc(PASSKEY_SENTENCE.format(key=key)), enc(PASSKEY_QUESTION)
    filler = enc(wikitext_text("validation", "raw")[:length * 8])[: length - len(intro) - len(sentence) - len(question)]
    at = int(depth * len(filler))
    return Passkey(intro + filler[:at] + sentence + filler[at:] + question, _answer_ids(tok, key))


def search_passkeys(tok, args) -> list[Passkey]:
    """The search's passkey prompts: WikiText-2 *validation* filler, one per --search-passkey length and
    --search-passkey-depths depth; with --search-passkey-protocol, built exactly as the evaluation's prompts
    (sentence boundaries, keys of seed 1)."""
    if not args.search_passkey_protocol:
        pairs = [(length, depth) for length in args.search_passkey for depth in args.search_passkey_depths]
        return [validation_passkey(tok, length, depth, i) for i, (length, depth) in enumerate(pairs)]
    protocol = PasskeyProtocol(lengths=tuple(args.search_passkey), depths=args.search_passkey_depths, seed=1,
                               filler_split="validation")
    return [Passkey(item.ids, item.answer_ids) for item in passkey_prompts(tok, protocol)]


def write_recipe(found, args, path: Path) -> None:
    """The search's choice as a leanlm recipe (checked by ``parse_recipe`` before it is written)."""
    import yaml

    from leanlm.recipe import parse_recipe

    data = {"name": "smollm2-postnas", "model": args.model, "dtype": "bfloat16",
            "eval": {"method": "sliding", "window": 1024, "stride": 512, "max_tokens": 16384, "speed": False, "ood": True},
            "transforms": found.recipe, "recover": None}
    parse_recipe(data, str(path))
    header = (f"# PostNAS choice written by benchmarks/postnas.py (swap_search on WikiText-2 validation).\n"
              f"# Swapped layers: {found.swapped}; kept full attention: {sorted(int(k) for k in found.kept)}.\n"
              f"# Run:   .venv/bin/leanlm run {path} --out runs/postnas-recipe\n")
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def cast_weights(model, dtype):
    """Cast parameters only: buffers (RoPE's float32 inv_freq) keep their dtype, so a round trip changes nothing."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.to(dtype)
    return model


def cache_bytes(cache) -> int:
    return sum(layer.nbytes() if hasattr(layer, "nbytes") else
               sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None and t.dim() > 0)
               for layer in cache.layers)


@torch.no_grad()
def continuation(models: dict, windows: list[torch.Tensor], context: int, chunk: int = 512) -> dict:
    """Per model: prefill ``context`` tokens in chunks through a DynamicCache (bounded layers evict as they go),
    score the rest in one forward; NLL, KL and top-1 agreement against the first model; bytes after the prefill."""
    stats = {name: {"nll": 0.0, "kl": 0.0, "top1": 0, "bytes": 0} for name in models}
    count = 0
    for ids in windows:
        ref = None
        for name, model in models.items():
            cache = DynamicCache()
            for part in ids[None, :context].split(chunk, 1):
                model(part, **with_cache(cache), use_cache=True, logits_to_keep=1)
            stats[name]["bytes"] += cache_bytes(cache)
            start = cache.get_seq_length()
            pos = torch.arange(start, start + ids.shape[0] - context)[None]
            logits = model(ids[None, context:], **with_cache(cache), position_ids=pos, use_cache=True).logits[0, :-1]
            logp = F.log_softmax(logits.float(), -1)  # (scored, vocab)
            target = ids[context + 1:]
            stats[name]["nll"] += float(-logp.gather(-1, target[:, None]).sum())
            if ref is None:
                ref = logp
            stats[name]["kl"] += float((ref.exp() * (ref - logp)).sum())
            stats[name]["top1"] += int((logp.argmax(-1) == ref.argmax(-1)).sum())
        count += len(ids) - context - 1
    return {name: SimpleNamespace(perplexity=float(torch.tensor(s["nll"] / count).exp()), kl=s["kl"] / count,
                                  top1_agreement=s["top1"] / count, bytes_per_token=s["bytes"] / len(windows) / context,
                                  total_bytes_per_token=s["bytes"] / len(windows) / context, peak_bytes=None)
            for name, s in stats.items()}


def text_windows(ids: torch.Tensor, size: int, count: int) -> list[torch.Tensor]:
    if len(ids) < size * count:
        raise LeanLMError(f"{len(ids)} tokens are fewer than {count} windows of {size}")
    return [ids[i * size:(i + 1) * size] for i in range(count)]


@torch.no_grad()
def bytes_and_speed(models: dict, ids: torch.Tensor, contexts: list[int], args) -> dict:
    """Cache bytes at each context (one chunked prefill per model, engine functions), then alternated decode:
    ``args.speed_rounds`` rounds of ``args.decode_tokens`` greedy tokens per model, after ``args.warmup`` (default 0)
    untimed ones; ``args.compile``: the compiled lean step. Each run continues from where the last one stopped."""
    out, states = {}, {}
    warmup, compile = getattr(args, "warmup", 0), getattr(args, "compile", False)
    slots = contexts[-1] + max(64, warmup + args.speed_rounds * args.decode_tokens + 8)  # prompt + every decoded token
    for name, model in models.items():
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, slots)
        state = start_state(model, ids[None, :1], None, DynamicCache(), slots)
        done, curve = 0, []
        for target in contexts:
            logits = prefill(model, ids[None, done:target], state, chunk=args.chunk)
            done = target
            curve.append({"context": target, "bytes": cache_bytes(state.cache),
                          "swapped_layer_bytes": swapped_nbytes(state.cache)})
            print(f"  {name} @ {target}: {curve[-1]['bytes']:,} B", file=sys.stderr, flush=True)
        states[name] = (state, logits)
        out[name] = {"curve": curve}

    for name, model in models.items():  # decode as the engine does by default: a static cache + the lean step
        grown, logits = states[name]
        state = start_state(model, ids[None, :1], None, static_copy(model, grown.cache, slots), slots)
        state.advance(contexts[-1])
        states[name] = (state, logits, lean_step(model, state.cache, compile=compile))
        out[name]["decode_path"] = "lean step" if states[name][2] is not None else "model forward"
        del grown
    for model in models.values():
        enable_streaming_linears(model)  # what ``engine.decode.stream`` does for bf16 CPU weights

    def decode(name, tokens=args.decode_tokens):
        model, (state, logits, step) = models[name], states[name]
        token = logits.argmax(-1)
        began = time.perf_counter()
        for _ in range(tokens):
            logits = step(token[:, None], state) if step is not None else forward(model, token[:, None], state)[:, -1]
            token = logits.argmax(-1)
        states[name] = (state, logits, step)
        return tokens / (time.perf_counter() - began)

    def compiled(name):  # what ran, not what was asked: the lean step falls back to eager if compilation fails
        step = states[name][2]
        return step is not None and step.compile

    names = list(models)
    for name in names if warmup else ():  # compiles the step (compile=True) and warms caches
        decode(name, warmup)
    runs = alternate({n: (lambda n=n: decode(n)) for n in names}, args.speed_rounds)
    for n in names[1:]:
        out[n]["decode"] = {**median_ratio(runs[names[0]], runs[n]), "runs": runs[n], "base_runs": runs[names[0]],
                            "context": contexts[-1], "tokens_per_run": args.decode_tokens, "warmup_tokens": warmup,
                            "compile_asked": compile, "compiled": {m: compiled(m) for m in (names[0], n)}}
    return out


def parse_args():
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--options", default="sliding_window:window=128;linear;sliding_window:window=512",
                   help="candidates, ';'-separated, from the smallest cache to the largest")
    p.add_argument("--slack", type=float, default=0.0, help="per layer: smallest-cache option within this cost of the best")
    p.add_argument("--count", type=int, default=15)
    p.add_argument("--keep", type=int, default=1)
    p.add_argument("--search-len", type=int, default=1024)
    p.add_argument("--search-windows", type=int, default=1)
    p.add_argument("--score-from", type=int, default=512)
    p.add_argument("--search-passkey", type=ints, default=[1024],
                   help="validation passkey prompt lengths in tokens, comma-separated (0 = none)")
    p.add_argument("--search-passkey-depths", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.1,),
                   help="needle depths of the search's validation passkey prompts (their mean drop is scored)")
    p.add_argument("--search-passkey-protocol", action="store_true",
                   help="search passkey prompts built as the evaluation's (validation filler, sentence boundaries)")
    p.add_argument("--passkey-weight", type=float, default=0.02, help="search cost: KL nats per nat of passkey lost")
    p.add_argument("--passkey-budget", type=float, default=None,
                   help="search: add a layer only while the swapped set together loses <= this many passkey nats")
    p.add_argument("--fit-steps", type=int, default=5, help="layer-local steps inside the search")
    p.add_argument("--table", type=Path, default=None, help="reuse the sensitivity table of an earlier run's JSON")
    p.add_argument("--only-option", default=None, help="give every layer this option (e.g. linear; with --table no re-measurement)")
    p.add_argument("--recover-fit-steps", type=int, default=40)
    p.add_argument("--kd-cpu-minutes", type=float, default=2.5)
    p.add_argument("--kd-seq-len", type=int, default=256)
    p.add_argument("--kd-bf16", action="store_true", help="KD under bf16 autocast (several times faster on AVX512-BF16 CPUs)")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--continuation", type=int, default=128)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--passkey-lengths", type=ints, default=[2048, 4096])
    p.add_argument("--passkey-depths", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.2, 0.5, 0.8))
    p.add_argument("--byte-contexts", type=ints, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=4)
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core to other jobs)")
    p.add_argument("--skip", default="", help="stages to skip: uniform,recover,passkey,speed,botchan")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.out.exists():
        raise LeanLMError(f"'{args.out}' exists; benchmark results are never overwritten")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    result = {"command": " ".join(sys.argv), "versions": versions(), "git": git_info(), "cpu_threads": args.threads,
              "load_average_at_start": list(os.getloadavg()), "note": "speeds only as side-by-side ratios"}
    save = lambda: atomic_write_json(args.out.with_name(args.out.stem + ".partial.json"), result)  # noqa: E731
    teacher, tok = load_model(args.model, "bfloat16"), load_tokenizer(args.model)
    options = (args.only_option,) if args.only_option else tuple(args.options.split(";"))  # --table: re-picked
    config = SearchConfig(options=options, score_from=args.score_from, count=args.count, keep=args.keep,
                          fit_steps=args.fit_steps, slack=args.slack, passkey_weight=args.passkey_weight,
                          passkey_budget=args.passkey_budget)
    windows = torch.cat(calibration_batches(tok, args.search_windows, args.search_len, args.search_windows, seed=0))
    passkey = search_passkeys(tok, args) if min(args.search_passkey) > 0 else None
    table = json.loads(args.table.read_text())["search"]["table"] if args.table else None
    found = search(teacher, windows, config, passkey, table=table)
    result["search"] = found.to_dict()
    save()
    write_recipe(found, args, args.out.with_name(args.out.stem + "-recipe.yaml"))
    print(json.dumps({"swapped": found.swapped, "recipe": found.recipe}), file=sys.stderr, flush=True)
    models = {"original": teacher, "searched": copy.deepcopy(teacher)}
    apply_choice(models["searched"], found.table, found.swapped)
    uniform = list(range(1, len(found.table), 2))[: args.count]
    if "uniform" not in skip:
        models["uniform"] = copy.deepcopy(teacher)
        apply_choice(models["uniform"], found.table, uniform)
    result["layers"] = {"searched": found.swapped, "uniform": uniform,
                        "uniform_recipe": recipe_items(found.table, uniform, args.keep)}
    if "recover" not in skip:
        kd_windows = training_windows(tok, args.kd_seq_len, limit=64)
        fit_windows = torch.cat(calibration_batches(tok, 4, 512, 4, seed=1))
        result["recovery"] = {}
        for name in [n for n in models if n != "original"]:
            kd = DistillConfig(steps=1000, batch_size=2, seq_len=args.kd_seq_len, lr=1e-3, warmup_steps=2,
                               max_cpu_minutes=args.kd_cpu_minutes, checkpoint_every=0, bf16=args.kd_bf16)
            out_dir = str(args.out.with_name(args.out.stem + f"-kd-{name}"))
            float_teacher = cast_weights(copy.deepcopy(teacher), torch.float32)
            cast_weights(models[name], torch.float32)
            result["recovery"][name] = recover_swapped(models[name], float_teacher, fit_windows, kd_windows,
                                                       SwapRecoverConfig(fit_steps=args.recover_fit_steps, kd=kd), out_dir)
            cast_weights(models[name], torch.bfloat16)
            del float_teacher
            save()
    rows = []
    splits = {"test": tokenize_split(tok, "test", "paper")}
    if "botchan" not in skip:
        splits["botchan"] = torch.tensor(tok(ood_text(), add_special_tokens=False)["input_ids"])
    quality = {}
    for split, ids in splits.items():
        quality[split] = continuation(models, text_windows(ids, args.context + args.continuation, args.windows), args.context)
        print(f"{split}: " + ", ".join(f"{n} ppl {q.perplexity:.3f} kl {q.kl:.4f}" for n, q in quality[split].items()),
              file=sys.stderr, flush=True)
        result["quality_" + split] = {n: vars(q) for n, q in quality[split].items()}
        save()
    passkeys = {}
    if "passkey" not in skip:
        protocol = PasskeyProtocol(lengths=tuple(args.passkey_lengths), depths=args.passkey_depths)
        items = passkey_prompts(tok, protocol)
        passkeys = {n: passkey_eval(m, tok, None, items, protocol) for n, m in models.items()}
        result["passkey"] = {n: {"accuracy": r.accuracy, "answer_loglik": r.answer_loglik} for n, r in passkeys.items()}
        save()
    speed = {}
    if "speed" not in skip:
        ids = splits["test"][: args.byte_contexts[-1]]
        speed = bytes_and_speed({"original": models["original"], "searched": models["searched"]}, ids, args.byte_contexts, args)
        result["bytes_and_speed"] = speed
        save()
    for name in [n for n in models if n != "original"]:
        extra = {"split_botchan": vars(quality["botchan"][name]) if "botchan" in quality else None,
                 "ppl_ratio_botchan": quality["botchan"][name].perplexity / quality["botchan"]["original"].perplexity
                 if "botchan" in quality else None, "layers": result["layers"][name]}
        if passkeys:
            norm = normalise(passkeys[name], passkeys["original"])
            extra |= {"passkey": passkeys[name].accuracy, "passkey_normalised": norm["accuracy"],
                      "passkey_loglik_delta": norm["answer_loglik"]}
        if name in speed:
            curve = speed[name]["curve"]
            base = speed["original"]["curve"]
            extra |= {"cache_bytes_vs_context": curve, "cache_bytes_ratio": {str(c["context"]): c["bytes"] / b["bytes"]
                                                                             for c, b in zip(curve, base)},
                      "decode_tokens_per_s": speed[name]["decode"]["candidate"],
                      "decode_full_tokens_per_s": speed[name]["decode"]["base"],
                      "decode_speed_ratio": speed[name]["decode"]["ratio"]}
        rows.append(row(f"postnas-{name}", "leanlm", None, quality["test"][name], quality["test"]["original"], **extra))
    result["rows"] = rows
    result["targets"] = targets(rows[0] if rows else {}, len(found.table))
    atomic_write_json(args.out, result)
    args.out.with_suffix(".md").write_text(markdown(result))
    plots(result, args.out)
    print(markdown(result))
    return 0


def targets(r: dict, layers: int) -> dict:
    def at(d, k):
        return None if not d else d.get(k)
    return {"half_swapped": len(r.get("layers", [])) * 2 >= layers,
            "ood_ppl_ratio<=1.10": r.get("ppl_ratio_botchan"), "passkey_4k_normalised>=0.9": at(r.get("passkey_normalised"), "4096"),
            "cache_bytes_16k_ratio<=0.55": at(r.get("cache_bytes_ratio"), "16384"), "decode_16k_ratio>=1.5": r.get("decode_speed_ratio")}


def markdown(result: dict) -> str:
    fmt = lambda x, s=".3f": "—" if x is None else format(x, s)  # noqa: E731
    lines = ["| model | layers swapped | ppl ratio test | KL test | ppl ratio Botchan | passkey (norm.) | bytes ratio 16K | decode ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result.get("rows", []):
        pk = ", ".join(f"{k}: {fmt(v, '.2f')}" for k, v in (r.get("passkey_normalised") or {}).items()) or "—"
        lines.append(f"| {r['method']} | {len(r['layers'])} | {fmt(r['ppl_ratio'], '.4f')} | {fmt(r['kl'], '.4f')} | "
                     f"{fmt(r.get('ppl_ratio_botchan'), '.4f')} | {pk} | {fmt((r.get('cache_bytes_ratio') or {}).get('16384'))} | "
                     f"{fmt(r.get('decode_speed_ratio'), '.2f')} |")
    search_ = result.get("search", {})
    lines += ["", f"Swapped (search): {search_.get('swapped')}", "", "Kept full attention:"]
    lines += [f"- layer {k}: {v}" for k, v in (search_.get("kept") or {}).items()]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = result.get("bytes_and_speed")
    if speed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, data in speed.items():
            ax.plot([c["context"] for c in data["curve"]], [c["bytes"] / 2**20 for c in data["curve"]], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel("cache MiB (measured)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out.with_name(out.stem + "-bytes.png"), dpi=120)
        plt.close(fig)
    table = result["search"]["table"]
    fig, ax = plt.subplots(figsize=(9, 4))
    options = list(table[0]["options"])
    for k, option in enumerate(options):
        ax.bar([r["layer"] + (k - len(options) / 2) * 0.25 for r in table], [r["options"][option]["cost"] for r in table],
               width=0.25, label=option)
    swapped = set(result["search"]["swapped"])
    ax.set_xticks(range(len(table)), [f"{i}{'*' if i in swapped else ''}" for i in range(len(table))], fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("layer (* = swapped by the search)")
    ax.set_ylabel("cost: KL + w * passkey nats lost")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "-sensitivity.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LeanLMError as err:
        print(f"postnas: error: {err}", file=sys.stderr)
        sys.exit(2)
