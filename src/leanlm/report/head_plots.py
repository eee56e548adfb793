"""Layer × head heatmaps of head importance scores (matplotlib, no display needed)."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leanlm.analyze.scoring import HeadScores  # noqa: E402

WHICH = {"head": ("per_head", "query head"), "group": ("per_kv_group", "KV group")}


def padded(rows: list[list[float]]) -> np.ndarray:
    """(layers, max heads), NaN where a layer has fewer heads (per-layer pruned models)."""
    width = max((len(row) for row in rows), default=0)
    grid = np.full((len(rows), width), np.nan)
    for layer, row in enumerate(rows):
        grid[layer, : len(row)] = row
    return grid


def plot_head_heatmap(scores: HeadScores, path: str | Path, which: str = "head") -> None:
    """Heatmap of ``scores.per_head`` (which="head") or ``scores.per_kv_group`` (which="group")."""
    attribute, label = WHICH[which]
    grid = padded(getattr(scores, attribute))
    layers, width = grid.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 2.5 + 0.45 * width), 1.8 + 0.18 * layers))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # grey: heads a layer does not have
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_xlabel(label)
    ax.set_ylabel("layer")
    ax.set_xticks(range(width))
    ax.set_yticks(range(0, layers, max(1, layers // 15)))
    title = f"{scores.scorer} importance per {label} (higher = more important)"
    # Wrapped to the figure's width (about 14 characters per inch at 9 pt), so no title is clipped.
    ax.set_title(textwrap.fill(title, max(20, int(fig.get_figwidth() * 11))), fontsize=9)
    fig.colorbar(image, ax=ax, label=scores.scorer)
    fig.tight_layout()
    _save(fig, Path(path))


def plot_group_heatmap(scores: HeadScores, path: str | Path) -> None:
    """Heatmap of ``scores.per_kv_group`` (layers × KV groups)."""
    plot_head_heatmap(scores, path, which="group")


def _save(fig, path: Path) -> None:
    """Temp file, then rename: a half-written PNG never appears at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
