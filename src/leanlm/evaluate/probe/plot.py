"""The probe's plot: agreement with the teacher vs decoding step, and teacher-forced KL per step."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_agreement(results: dict, path: Path) -> None:
    """Left: share of prompts whose output is still identical (solid) and token agreement (dashed) per step.
    Right: mean KL(teacher || student) per step, teacher-forced on the teacher's greedy output."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, (label, student) in enumerate(results["students"].items()):
        color = f"C{i}"
        curves = student["curves"]
        steps = range(1, len(curves["identical_so_far"]) + 1)
        left.plot(steps, curves["identical_so_far"], color=color, label=f"{label}: identical so far")
        left.plot(steps, curves["token_agreement"], color=color, linestyle="--", label=f"{label}: same token")
        right.plot(steps, curves["kl"], color=color, label=label)
    left.set_xlabel("generated token")
    left.set_ylabel("share of prompts")
    left.set_ylim(0, 1.02)
    left.set_title(f"greedy agreement with the teacher ({results['num_prompts']} prompts)")
    left.legend(fontsize=7)
    right.set_xlabel("generated token")
    right.set_ylabel("KL(teacher || student), nats")
    right.set_title("per-step KL, teacher-forced")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_report(results: dict) -> str:
    """A table per student (overall + each family) and the families where it departs most."""
    lines = [f"# Behaviour probe: {results.get('teacher', 'teacher')} vs its students", "",
             f"{results['num_prompts']} prompts, {results['config']['new_tokens']} greedy tokens each, seed "
             f"{results['config']['seed']}; teacher accuracy on graded prompts: {_pct(results['teacher_accuracy'])}.", ""]
    for label, student in results["students"].items():
        lines += [f"## {label}", "", "| family | prompts | agreement | first divergence (mean) | identical outputs | "
                  "KL (nats/token) | forced top-1 | accuracy teacher / student |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for name, row in [("all", student["overall"]), *student["families"].items()]:
            acc = (f"{_pct(row['accuracy_teacher'])} / {_pct(row['accuracy_student'])}" if "accuracy_teacher" in row else "")
            lines.append(f"| {name} | {row['prompts']} | {row['agreement']:.3f} | {row['first_divergence_mean']:.1f} | "
                         f"{row['identical_outputs']:.2f} | {row['kl_mean']:.4f} | {row['forced_top1']:.3f} | {acc} |")
        lines += ["", f"Departs most (lowest agreement first): {', '.join(student['departs_most'])}", ""]
    lines += ["![agreement vs step](plots/agreement.png)", ""]
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"
