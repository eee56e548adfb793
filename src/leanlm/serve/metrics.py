"""Server metrics in the Prometheus text format (``GET /metrics``): gauges, counters, histograms.

Written by the scheduler thread and the request handlers, read by the scrape: one lock guards all.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound}"}} {running}')
        return out + [f"{name}_sum {self.total:.6f}", f"{name}_count {running}"]


class Metrics:
    """What ``/metrics`` reports; ``window`` seconds of generated tokens give the tokens/s gauge."""

    def __init__(self, window: float = 10.0):
        self.lock = threading.Lock()
        self.window = window
        self.requests: dict[str, int] = {}  # finish reason or HTTP error class → count
        self.prompt_tokens = self.generated_tokens = 0
        self.queue_depth = self.running = self.cache_bytes = self.cache_capacity_bytes = 0
        self.ttft, self.per_token, self.e2e = Histogram(), Histogram(), Histogram()
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    def count_request(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def tokens(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            self.generated_tokens += count
            self.recent.append((now, count))
            while self.recent and self.recent[0][0] < now - self.window:
                self.recent.popleft()

    def observe(self, histogram: str, value: float) -> None:
        with self.lock:
            getattr(self, histogram).observe(value)

    def set_state(self, **values) -> None:
        with self.lock:
            for name, value in values.items():
                setattr(self, name, value)

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self.lock:
            return sum(n for t, n in self.recent if t >= now - self.window) / self.window

    def render(self) -> str:
        rate = self.tokens_per_second()
        with self.lock:
            lines = [
                *_metric("leanlm_queue_depth", "gauge", "requests waiting for a slot", self.queue_depth),
                *_metric("leanlm_running_sequences", "gauge", "sequences in the running batch", self.running),
                *_metric("leanlm_cache_bytes", "gauge", "KV-cache bytes held now", self.cache_bytes),
                *_metric("leanlm_cache_capacity_bytes", "gauge", "cap on KV-cache bytes (admission control)",
                         self.cache_capacity_bytes),
                *_metric("leanlm_generation_tokens_per_second", "gauge",
                         f"generated tokens per second over the last {self.window:g} s", round(rate, 3)),
                *_metric("leanlm_prompt_tokens_total", "counter", "prompt tokens prefilled", self.prompt_tokens),
                *_metric("leanlm_generation_tokens_total", "counter", "tokens generated", self.generated_tokens),
                "# HELP leanlm_requests_total requests by outcome (finish reason or error)",
                "# TYPE leanlm_requests_total counter",
                *[f'leanlm_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())],
            ]
            for name, help_text, hist in (
                    ("leanlm_time_to_first_token_seconds", "time from arrival to the first token", self.ttft),
                    ("leanlm_time_per_output_token_seconds", "time between consecutive tokens of a sequence",
                     self.per_token),
                    ("leanlm_e2e_request_latency_seconds", "time from arrival to the last token", self.e2e)):
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, value) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
