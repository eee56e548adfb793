"""Evaluation: perplexity (named protocols), memory, speed, and the harness that runs them together."""

from leanlm.evaluate.harness import EvalConfig, evaluate, write_eval_run
from leanlm.evaluate.memory import (
    MemoryReport,
    measured_kv_bytes_per_token,
    memory_report,
    param_count,
    peak_rss_mb,
    weight_bytes,
)
from leanlm.evaluate.perplexity import PerplexityProtocol, PerplexityResult, perplexity, token_nll
from leanlm.evaluate.speed import SpeedConfig, SpeedResult, measure_speed

__all__ = [
    "EvalConfig",
    "MemoryReport",
    "PerplexityProtocol",
    "PerplexityResult",
    "SpeedConfig",
    "SpeedResult",
    "evaluate",
    "measure_speed",
    "measured_kv_bytes_per_token",
    "memory_report",
    "param_count",
    "peak_rss_mb",
    "perplexity",
    "token_nll",
    "weight_bytes",
    "write_eval_run",
]
