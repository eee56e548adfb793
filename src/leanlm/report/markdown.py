"""Markdown reports: a metrics table, the protocol, the plots."""

from __future__ import annotations


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.1f} {unit}" if unit != "B" else f"{value:,.0f} B"
        value /= 1024
    return f"{value:.1f} GiB"


def _per_key(values: dict | None, label: str, fmt: str) -> list[tuple[str, str]]:
    if not values:
        return []
    return [(f"{label} {key}", format(value, fmt)) for key, value in values.items()]


def metrics_rows(results: dict) -> list[tuple[str, str]]:
    protocol = results["protocol"]
    rows = [
        ("perplexity", f"{results['perplexity']:.3f}"),
        ("tokens scored", f"{protocol['tokens_scored']:,}"),
        ("KV cache bytes / token (measured)", f"{results['kv_bytes_per_token']:,.0f} ({results['kv_cache_dtype']})"),
        ("KV cache bytes / token (analytic)", f"{results['kv_bytes_per_token_analytic']:,.0f}"),
        ("weights", human_bytes(results["weight_bytes"])),
        ("parameters", f"{results['params']:,}"),
        ("peak RSS", f"{results['peak_rss_mb']:,.0f} MiB"),
    ]
    rows += _per_key(results.get("prefill_tokens_per_s"), "prefill tokens/s, prompt", ".1f")
    rows += _per_key(results.get("decode_tokens_per_s"), "decode tokens/s, batch", ".1f")
    rows += _per_key(results.get("decode_latency_ms_p50"), "decode latency p50 (ms), batch", ".1f")
    rows += _per_key(results.get("decode_latency_ms_p95"), "decode latency p95 (ms), batch", ".1f")
    return rows


def table(rows: list[tuple[str, str]], header: tuple[str, str] = ("metric", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | ---: |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def eval_report_markdown(results: dict, plots: list[str]) -> str:
    protocol = results["protocol"]
    parts = [
        f"# leanlm eval: {results.get('model', 'model')}",
        "",
        table(metrics_rows(results)),
        "",
        "## Perplexity protocol",
        "",
        f"WikiText-2 **{protocol['split']}**, method `{protocol['method']}` (text joined `{protocol['join']}`), "
        f"window {protocol['window']}"
        + (f", stride {protocol['stride']}" if protocol["method"] == "sliding" else "")
        + f", first {protocol['tokens_in_split_used']:,} tokens of the split, {protocol['num_windows']} windows, "
        f"{protocol['tokens_scored']:,} tokens scored, dtype {protocol['dtype']}.",
        "",
    ]
    if "speed_protocol" in results:
        sp = results["speed_protocol"]
        parts += [
            "## Speed protocol",
            "",
            f"dtype {sp['dtype']}; prefill of random prompts of {list(sp['prefill_lengths'])} tokens; greedy decode of "
            f"{sp['decode_tokens']} tokens after a {sp['decode_prompt']}-token prompt at batch {list(sp['decode_batch_sizes'])}; "
            f"{sp['warmup']} warm-up run(s), median of {sp['repeats']} timed runs. This machine is shared and noisy: "
            "compare speeds only as ratios measured in one run.",
            "",
        ]
    parts += [f"![{p}]({p})" for p in plots]
    git = results.get("git", {})
    parts += ["", f"leanlm {results['versions'].get('leanlm')}, commit {git.get('commit')}"
              + (" (dirty)" if git.get("dirty") else "") + f", torch {results['versions'].get('torch')}, "
              f"transformers {results['versions'].get('transformers')}.", ""]
    return "\n".join(parts)
