"""The rows every KV benchmark writes (kv_pareto, kv_structure, postnas): one row per method and
budget, the issue's targets, the retrieval flag, the Markdown table and the Pareto plot, and the digest
that proves two sources scored the same windows. Imported by the benchmark scripts (their folder is on
``sys.path`` when they run)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from leanlm.errors import LeanLMError
from leanlm.report import atomic_write_json


def windows_digest(windows: list[list[int]]) -> str:
    """sha256 of the token ids of every window, in order (kvpress_driver.py computes the same)."""
    return hashlib.sha256(json.dumps([[int(t) for t in w] for w in windows]).encode()).hexdigest()


def check_same_windows(theirs: str | None, ours: str, who: str) -> None:
    """Stop unless ``who`` scored exactly the token ids of leanlm's windows (digests equal)."""
    if theirs != ours:
        raise LeanLMError(f"{who} scored other windows than leanlm's rows (token-id digest {theirs} != {ours}): "
                          "its rows would not be comparable")


def row(method: str, source: str, budget: float, cont, baseline_cont, **extra) -> dict:
    return {"method": method, "source": source, "budget": budget, "bytes_per_token": cont.bytes_per_token,
            "total_bytes_per_token": cont.total_bytes_per_token,
            "ppl": cont.perplexity, "ppl_ratio": cont.perplexity / baseline_cont.perplexity, "kl": cont.kl,
            "top1_agreement": cont.top1_agreement, "peak_bytes": cont.peak_bytes, **extra}


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


def write_outputs(result: dict, out: Path) -> None:
    for r in result["rows"]:
        r["flag"] = retrieval_flag(r)
    atomic_write_json(out, result)
    out.with_suffix(".md").write_text(markdown(result))
    pareto_plot(result, out.with_name(out.stem + "-pareto.png"))
    print(markdown(result))
