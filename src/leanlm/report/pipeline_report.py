"""report.md and plots for a pipeline run: before / after table, recovery variants, training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leanlm.analyze.scoring import HeadScores  # noqa: E402
from leanlm.report.head_plots import plot_head_heatmap  # noqa: E402
from leanlm.report.markdown import human_bytes  # noqa: E402
from leanlm.report.results import atomic_write_text  # noqa: E402

RECOVERY_ROWS = [("kd_oproj", "pruned + KD, no LoRA (o_proj trains)"), ("lora_kd", "pruned + LoRA + KD"),
                 ("reference", "unpruned + LoRA + CE (domain-adaptation reference)")]


def describe_transform(record: dict) -> str:
    """One sentence on what a transform did, from its record (settings + what it removed)."""
    name, settings, removed = record["name"], record["settings"], record["removed"]
    data = data_words(record.get("data", {}).get("spec"))
    if name == "prune_heads":
        return (f"Removed {removed['fraction_achieved']:.1%} of the query heads ({settings['layout']} layout, "
                f"{settings['granularity']} granularity, scored by `{settings['scorer']}` on {data})")
    if name == "prune_layers":
        return (f"Removed decoder blocks {removed['layers']} of {removed['layers_before']}"
                + (f" (lowest Block Influence on {data})" if removed.get("block_influence") else ""))
    if name == "prune_mlp":
        return f"Removed {removed['fraction_achieved']:.1%} of the MLP channels ({settings['layout']} layout, activation x weight)"
    options = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "name")
    return f"Applied `{name}` ({options}); parameters {record['params_before']:,} -> {record['params_after']:,}"


def _rows(results: dict) -> list[tuple[str, dict]]:
    """(label, metrics) of every measured model: original, after each transform, each recovery."""
    rows = [("original", results["baseline"])]
    steps = results.get("transforms") or []
    for i, step in enumerate(steps, 1):
        label = f"after {i}. {step['name']}" + (" (no recovery)" if i == len(steps) else "")
        rows.append((label, step["metrics"]))
    rows += [(label, results[key]) for key, label in RECOVERY_ROWS if results.get(key)]
    return rows


def _speed(metrics: dict, key: str, sub: str) -> str:
    value = (metrics.get(key) or {}).get(sub)
    return f"{value:.1f}" if value is not None else "–"


def data_words(spec) -> str:
    """A data spec in words for reports (None or 'wikitext' = WikiText-2 validation)."""
    if isinstance(spec, list):  # a recipe's list form
        spec = ",".join(item if isinstance(item, str) else str(item.get("source")) for item in spec)
    return "WikiText-2 validation" if spec in (None, "wikitext") else f"`{spec}`"


def _training_words(results: dict) -> str:
    recover = results["recipe"].get("recover") or {}
    return data_words(recover.get("data") or results["recipe"].get("data"))


def texts_table(results: dict) -> str:
    """Perplexity on the recipe's extra evaluation texts (eval.texts), each as a ratio to the original."""
    base = results["baseline"].get("texts") or {}
    if not base:
        return ""
    lines = ["| model | " + " | ".join(f"ppl ({name}) | ratio" for name in base) + " |",
             "| --- |" + " ---: | ---: |" * len(base)]
    for label, m in _rows(results):
        cells = [(m.get("texts") or {}).get(name, {}).get("perplexity") for name in base]
        lines.append(f"| {label} | " + " | ".join(f"{c:.3f} | {c / base[n]['perplexity']:.3f}" if c else "– | –"
                                                  for c, n in zip(cells, base)) + " |")
    return "\n".join(lines)


def comparison_table(results: dict) -> str:
    base = results["baseline"]
    lines = ["| model | ppl (test) | ratio | ppl (Botchan, OOD) | ratio | KV bytes/token | params | weights | prefill tok/s @2048 | decode tok/s @1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, m in _rows(results):
        ood, base_ood = m.get("ood_perplexity"), base.get("ood_perplexity")
        ood_cells = f"{ood:.3f} | {ood / base_ood:.3f}" if ood and base_ood else "– | –"
        lines.append(
            f"| {label} | {m['perplexity']:.3f} | {m['perplexity'] / base['perplexity']:.3f} | {ood_cells} | "
            f"{m['kv_bytes_per_token']:,.0f} | {m['params']:,} | {human_bytes(m['weight_bytes'])} | "
            f"{_speed(m, 'prefill_tokens_per_s', '2048')} | {_speed(m, 'decode_tokens_per_s', '1')} |"
        )
    return "\n".join(lines)


def plot_training(training: dict[str, dict], path: Path, which: str) -> bool:
    """which='eval': perplexity on the first test tokens during training; 'loss': training loss per step."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = False
    for variant, record in training.items():
        if which == "eval" and record.get("eval_curve"):
            steps, values = zip(*record["eval_curve"])
            ax.plot(steps, values, marker="o", label=variant)
            drawn = True
        if which == "loss" and record.get("losses"):
            ax.plot([x["step"] for x in record["losses"]], [x["total"] for x in record["losses"]], label=variant, linewidth=1)
            drawn = True
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity (first test tokens)" if which == "eval" else "training loss")
    ax.set_title("perplexity during recovery" if which == "eval" else "recovery loss")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_pipeline_report(out: Path, results: dict, training: dict[str, dict]) -> None:
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    images = []
    for step in results.get("transforms") or []:
        if step["record"].get("scores"):
            image = f"plots/{step['stage']}-head_scores.png"
            plot_head_heatmap(HeadScores(**step["record"]["scores"]), out / image)
            images.append(image)
    for which in ("eval", "loss"):
        if plot_training(training, plots / f"training_{which}.png", which):
            images.append(f"plots/training_{which}.png")
    base = results["baseline"]
    protocol = base["protocol"]
    done = [f"{i}. {describe_transform(s['record'])}." for i, s in enumerate(results.get("transforms") or [], 1)]
    parts = [
        f"# leanlm run: {results['name']}", "",
        f"Model `{results['model']}` on `{results.get('device', 'cpu')}`. Transforms, in order:", "",
        *(done or ["(none)"]), "",
        comparison_table(results), "", texts_table(results), "",
        f"Perplexity protocol (every row): WikiText-2 test, `{protocol['method']}`, window {protocol['window']}, "
        f"stride {protocol['stride']}, {protocol['tokens_scored']:,} tokens scored, {protocol['dtype']}. Out-of-domain: "
        f"{base.get('ood_protocol', {}).get('text_source', 'not measured')}, same protocol. Calibration data: "
        f"{data_words(results['recipe'].get('data'))}; training data: {_training_words(results)}. Speeds are from separate runs on a shared machine: compare them with care "
        "(the benchmark measures speed ratios side by side).", "",
        "## Recovery runs", "", "| variant | steps | minutes | stopped by time budget | final loss |", "| --- | ---: | ---: | --- | ---: |",
    ]
    for variant, t in results.get("training", {}).items():
        loss = f"{t['final_loss']:.4f}" if t["final_loss"] is not None else "–"
        parts.append(f"| {variant} | {t['steps']} | {t['train_minutes']:.1f} | {t['stopped_early']} | {loss} |")
    parts += ["", *[f"![{img}]({img})" for img in images], ""]
    atomic_write_text(out / "report.md", "\n".join(parts))
