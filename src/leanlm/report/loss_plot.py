"""The distillation loss curve (total, KD, CE per step; the eval curve on a second axis)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def plot_loss_curve(result, path: str | Path) -> None:
    """Loss per step of a ``leanlm.recover.DistillResult`` (total, KD, CE); the eval curve on a second axis if there is one."""
    import matplotlib  # here, not at the top: it costs a second of import time for every user of distill

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [row["step"] for row in result.losses]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in ("total", "kd", "ce"):
        ax.plot(steps, [row[key] for row in result.losses], linewidth=1, label=f"{key} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if result.eval_curve:
        twin = ax.twinx()
        eval_steps, values = zip(*result.eval_curve)
        twin.plot(eval_steps, values, color="black", marker="o", linewidth=1, label="eval")
        twin.set_ylabel("eval")
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize="small")
    ax.set_title("distillation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # atomic: temp file, then rename
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
