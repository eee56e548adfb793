"""Speed: prefill tokens/s, decode tokens/s and per-token latency, with warm-up and repeats.

Everything is timed through the decode engine (``leanlm.engine``), the loop ``leanlm generate`` uses.

Timings on a shared machine are noisy: each number is the median of `repeats` runs after
`warmup` runs, and comparisons between models should be ratios measured in the same process.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from leanlm.engine import Sampler, static_cache
from leanlm.engine.decode import prefill, start_state, stream
from leanlm.errors import LeanLMError
from leanlm.models.device import model_device, synced_clock


@dataclass
class SpeedConfig:
    prefill_lengths: tuple[int, ...] = field(default=(512, 2048), metadata={"help": "prompt lengths timed"})
    decode_batch_sizes: tuple[int, ...] = field(default=(1, 4), metadata={"help": "batch sizes for decode"})
    decode_prompt: int = field(default=128, metadata={"help": "prompt tokens before decoding"})
    decode_tokens: int = field(default=32, metadata={"help": "new tokens per decode run"})
    warmup: int = field(default=1, metadata={"help": "untimed runs first"})
    repeats: int = field(default=3, metadata={"help": "timed runs; the median is reported"})
    cache: str = field(default="static", metadata={"help": "decode cache: static (preallocated) or dynamic"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step (static cache)"})

    def validate(self) -> None:
        values = [*self.prefill_lengths, *self.decode_batch_sizes, self.decode_prompt, self.decode_tokens, self.repeats]
        if min(values) < 1 or self.warmup < 0:
            raise LeanLMError("speed lengths, batch sizes, token counts and repeats must be positive")
        if self.cache not in ("static", "dynamic"):
            raise LeanLMError(f"speed cache must be 'static' or 'dynamic', got '{self.cache}'")


@dataclass
class SpeedResult:
    prefill_tokens_per_s: dict[str, float]  # key: prompt length
    decode_tokens_per_s: dict[str, float]  # key: batch size; tokens of all sequences per second
    decode_latency_ms_p50: dict[str, float]  # key: batch size; one decode step (one token per sequence)
    decode_latency_ms_p95: dict[str, float]
    decode_latencies_ms: dict[str, list[float]]  # every timed step, for plots
    config: dict
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def _random_ids(model, batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 100_003 + length)  # CPU: the same ids on every device
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)  # (batch, length)
    return ids.to(model_device(model))


def time_prefill(model, length: int, warmup: int, repeats: int) -> float:
    """Median tokens/s of building the cache from a `length`-token prompt in one chunk (as generate does)."""
    ids, device = _random_ids(model, 1, length), model_device(model)
    seconds = []
    with torch.inference_mode():
        for run in range(warmup + repeats):
            state = start_state(model, ids, None, None, length)
            state.cache = _new_cache(model, "dynamic", length)
            start = synced_clock(device)
            prefill(model, ids, state, chunk=length)
            if run >= warmup:
                seconds.append(synced_clock(device) - start)
    return length / statistics.median(seconds)


def _new_cache(model, kind: str, length: int):
    from transformers import DynamicCache

    return static_cache(model, length) if kind == "static" else DynamicCache()


def decode_step_times(model, batch: int, prompt: int, new_tokens: int, cache: str = "static",
                      compile: bool = False) -> list[float]:
    """Greedy engine decode of `new_tokens` after a prompt; the seconds of each decode step (forward + pick)."""
    ids = _random_ids(model, batch, prompt)
    steps = stream(model, ids, new_tokens + 1, _new_cache(model, cache, prompt + new_tokens + 1), Sampler(),
                   prefill_chunk=prompt, compile=compile)
    next(steps)  # the prefill and the first token
    times = []
    start = synced_clock(ids.device)
    for _ in steps:
        now = synced_clock(ids.device)
        times.append(now - start)
        start = now
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def measure_speed(model, config: SpeedConfig | None = None) -> SpeedResult:
    config = config or SpeedConfig()
    config.validate()
    prefill = {}
    for length in tqdm(config.prefill_lengths, desc="prefill speed", leave=False):
        prefill[str(length)] = time_prefill(model, length, config.warmup, config.repeats)
    tokens_per_s, p50, p95, all_steps = {}, {}, {}, {}
    for batch in tqdm(config.decode_batch_sizes, desc="decode speed", leave=False):
        for _ in range(config.warmup):
            decode_step_times(model, batch, config.decode_prompt, config.decode_tokens, config.cache, config.compile)
        runs = [decode_step_times(model, batch, config.decode_prompt, config.decode_tokens, config.cache, config.compile)
                for _ in range(config.repeats)]
        key = str(batch)
        tokens_per_s[key] = statistics.median(batch * len(run) / sum(run) for run in runs)
        steps_ms = [s * 1000 for run in runs for s in run]
        p50[key], p95[key], all_steps[key] = percentile(steps_ms, 50), percentile(steps_ms, 95), steps_ms
    return SpeedResult(prefill, tokens_per_s, p50, p95, all_steps, asdict(config), str(model.dtype).removeprefix("torch."))
