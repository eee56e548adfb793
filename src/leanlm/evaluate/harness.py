"""One evaluation, the same way every time: perplexity, memory, speed -> results.json + report.md + plots."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from leanlm.evaluate.memory import memory_report
from leanlm.evaluate.perplexity import PerplexityProtocol, perplexity
from leanlm.evaluate.speed import SpeedConfig, measure_speed
from leanlm.models import ModelSpec
from leanlm.report import atomic_write_json, atomic_write_text, git_info, staged_output, versions
from leanlm.report.markdown import eval_report_markdown
from leanlm.report.plots import plot_decode_latency, plot_window_nll


@dataclass
class EvalConfig:
    perplexity: PerplexityProtocol = field(default_factory=PerplexityProtocol)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    measure_speed: bool = field(default=True, metadata={"help": "time prefill and decode"})


def evaluate(model, tokenizer, config: EvalConfig | None = None) -> dict:
    """All metrics of one model as a flat dict (the keys every leanlm results.json shares)."""
    config = config or EvalConfig()
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, config.perplexity)
    speed = measure_speed(model, config.speed) if config.measure_speed else None
    memory = memory_report(model)  # last, so peak RSS covers the whole evaluation
    results = {
        "perplexity": ppl.perplexity,
        "mean_nll": ppl.mean_nll,
        "protocol": ppl.protocol,
        **memory.to_dict(),
        "spec": ModelSpec.from_model(model).to_dict(),
    }
    if speed is not None:
        results |= {
            "prefill_tokens_per_s": speed.prefill_tokens_per_s,
            "decode_tokens_per_s": speed.decode_tokens_per_s,
            "decode_latency_ms_p50": speed.decode_latency_ms_p50,
            "decode_latency_ms_p95": speed.decode_latency_ms_p95,
            "speed_protocol": speed.config | {"dtype": speed.dtype, "prefill_key": "prompt tokens", "decode_key": "batch size"},
        }
    results["seconds"] = {"perplexity": ppl.seconds, "total": time.perf_counter() - start}
    results["versions"] = versions()
    results["git"] = git_info()
    # Raw series for the plots; popped before results.json is written.
    results["_series"] = {"window_nll": ppl.window_nll, "decode_latencies_ms": speed.decode_latencies_ms if speed else {}}
    return results


def write_eval_run(results: dict, out: Path, header: dict) -> Path:
    """Write results.json, report.md and plots/ into a new directory `out` (never overwritten)."""
    series = results.pop("_series", {})
    results = header | results
    with staged_output(Path(out)) as stage:
        plots = stage / "plots"
        plots.mkdir()
        names = []
        if series.get("window_nll"):
            plot_window_nll(series["window_nll"], results["protocol"], plots / "perplexity_windows.png")
            names.append("perplexity_windows.png")
        if series.get("decode_latencies_ms"):
            plot_decode_latency(series["decode_latencies_ms"], plots / "decode_latency.png")
            names.append("decode_latency.png")
        atomic_write_json(stage / "results.json", results)
        atomic_write_text(stage / "report.md", eval_report_markdown(results, [f"plots/{n}" for n in names]))
    return Path(out)
