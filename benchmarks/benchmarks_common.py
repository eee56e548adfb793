"""Helpers of the speed benchmarks: memory bandwidth, weight bytes, the table and the plot
(decode_speed.py); the ATen-bf16-against-widened rows (prefill_speed.py, widen_speed.py).
Import it after putting ``src`` on ``sys.path``, as those scripts do."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from leanlm.evaluate.side_by_side import median_ratio
from leanlm.report import atomic_write_json


def bandwidth_gbs(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Median GB/s of copying a ``mib`` MiB tensor (bytes read + bytes written), with ``threads`` threads."""
    torch.set_num_threads(threads)
    source = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)  # touch the pages first
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        speeds.append(2 * source.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return statistics.median(speeds)


def weight_bytes(model) -> int:
    """Bytes of every distinct parameter and buffer storage (a tied embedding/head counts once;
    the rotary table is left out). A decode step reads all of them once, except the embedding rows."""
    seen, total = set(), 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "rotary" in name or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def markdown_table(rows: list[dict], report: dict) -> str:
    lines = [f"Memory bandwidth (tensor copy, same run): {report['bandwidth_gbs']:.1f} GB/s at the start, "
             f"{report['bandwidth_after_gbs']:.1f} GB/s at the end. Shared machine: compare ratios.\n",
             "| method | batch | context | tokens/s | ms/step | eff. GB/s | % of bandwidth | vs engine_static | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["batch"], r["context"]): r["tokens_per_s"] for r in rows if r["method"] == "engine_static" and "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['method']} | {r['batch']} | {r['context']} | error | | | | | {r.get('error', '')[:80]} |")
            continue
        ratio = r["tokens_per_s"] / base[(r["batch"], r["context"])] if (r["batch"], r["context"]) in base else float("nan")
        notes = ", ".join(f"{k}={r[k]:.2f}" if isinstance(r[k], float) else f"{k}={r[k]}"
                          for k in ("acceptance_rate", "identical_to_greedy", "includes_prefill", "note") if k in r)
        lines.append(f"| {r['method']} | {r['batch']} | {r['context']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['effective_gbs']:.2f} | {100 * r['bandwidth_share']:.0f}% | {ratio:.2f}x | {notes} |")
    for name, why in report["skipped"].items():
        lines.append(f"| {name} | | | skipped | | | | | {why} |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r["context"], r["tokens_per_s"]) for r in rows
                            if r["method"] == method and r["batch"] == batch and "tokens_per_s" in r)
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set(xscale="log", xlabel="context (tokens)", ylabel="decode tokens/s (all sequences)", title=f"batch {batch}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def widened_ab_row(runs: dict[str, list[float]], tokens: int) -> dict:
    """Seconds of alternated ``aten_bf16`` / ``widened`` runs over ``tokens`` tokens -> a report row's
    timing fields (medians of tokens/s, widened / ATen ratio); ``prefill_speed`` and ``widen_speed``."""
    speed = median_ratio([tokens / t for t in runs["aten_bf16"]], [tokens / t for t in runs["widened"]])
    return {"aten_bf16_seconds": runs["aten_bf16"], "widened_seconds": runs["widened"],
            "aten_bf16_tokens_per_s": speed["base"], "widened_tokens_per_s": speed["candidate"],
            "speed_ratio": speed["ratio"]}


def print_ab(label: str, row: dict, extra: str = "") -> None:
    print(f"{label}: ATen bf16 {row['aten_bf16_tokens_per_s']:.0f} tok/s, widened {row['widened_tokens_per_s']:.0f} "
          f"tok/s ({row['speed_ratio']:.2f}x){extra}", flush=True)


def write_report(report: dict, out: Path) -> None:
    report["load_average_at_end"] = os.getloadavg()
    atomic_write_json(out, report)
    print(f"wrote {out}")
