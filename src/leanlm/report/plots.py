"""Plots for evaluation reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_window_nll(window_nll: list[float], protocol: dict, path: Path) -> None:
    """Mean NLL of each perplexity window, along the text."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(range(1, len(window_nll) + 1), window_nll, marker=".", linewidth=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # windows are counted, not measured
    ax.set_xlabel("window (1 = start of the text)")
    ax.set_ylabel("mean NLL per token (nats)")
    ax.set_title(f"WikiText-2 {protocol['split']}: {protocol['method']} window {protocol['window']}, {protocol['dtype']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decode_latency(latencies_ms: dict[str, list[float]], path: Path) -> None:
    """Distribution of per-step decode latency for each batch size."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for batch, values in latencies_ms.items():
        ax.hist(values, bins=30, alpha=0.6, label=f"batch {batch}")
    ax.set_xlabel("decode step latency (ms)")
    ax.set_ylabel("steps")
    ax.set_title("decode latency per step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_kv_windows(policy: dict, full: dict, path: Path) -> None:
    """Mean NLL of each window through a KV-cache policy beside the full cache (`eval --kv-cache`)."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for result, label in ((full, "full cache"), (policy, policy["policy"].get("policy", "policy"))):
        values = result["window_nll"]
        ax.plot(range(1, len(values) + 1), values, marker=".", linewidth=1, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("window (1 = start of the text)")
    ax.set_ylabel("mean NLL per token (nats)")
    ax.set_title(f"WikiText-2 {policy['protocol'].get('split', '')}: per-window NLL, policy vs full cache")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
