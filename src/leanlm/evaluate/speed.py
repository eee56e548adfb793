"""Speed: prefill tokens/s, decode tokens/s and per-token latency, with warm-up and repeats.

Timings on a shared machine are noisy: each number is the median of `repeats` runs after
`warmup` runs, and comparisons between models should be ratios measured in the same process.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from leanlm.errors import LeanLMError
from leanlm.models.compat import with_cache
from leanlm.models.device import model_device, synced_clock


@dataclass
class SpeedConfig:
    prefill_lengths: tuple[int, ...] = field(default=(512, 2048), metadata={"help": "prompt lengths timed"})
    decode_batch_sizes: tuple[int, ...] = field(default=(1, 4), metadata={"help": "batch sizes for decode"})
    decode_prompt: int = field(default=128, metadata={"help": "prompt tokens before decoding"})
    decode_tokens: int = field(default=32, metadata={"help": "new tokens per decode run"})
    warmup: int = field(default=1, metadata={"help": "untimed runs first"})
    repeats: int = field(default=3, metadata={"help": "timed runs; the median is reported"})

    def validate(self) -> None:
        values = [*self.prefill_lengths, *self.decode_batch_sizes, self.decode_prompt, self.decode_tokens, self.repeats]
        if min(values) < 1 or self.warmup < 0:
            raise LeanLMError("speed lengths, batch sizes, token counts and repeats must be positive")


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
    """Median tokens/s of one forward pass over `length` tokens that builds the cache (as generate does)."""
    ids, device = _random_ids(model, 1, length), model_device(model)
    seconds = []
    with torch.inference_mode():
        for run in range(warmup + repeats):
            start = synced_clock(device)
            model(ids, use_cache=True, logits_to_keep=1)
            if run >= warmup:
                seconds.append(synced_clock(device) - start)
    return length / statistics.median(seconds)


def decode_step_times(model, batch: int, prompt: int, new_tokens: int) -> list[float]:
    """Greedy decode of `new_tokens` after a prompt; returns the seconds of each decode step."""
    ids, device = _random_ids(model, batch, prompt), model_device(model)
    steps = []
    with torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
        cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
        for _ in range(new_tokens):
            start = synced_clock(device)
            out = model(next_ids, **with_cache(cache), use_cache=True)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            steps.append(synced_clock(device) - start)
    return steps


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
            decode_step_times(model, batch, config.decode_prompt, config.decode_tokens)
        runs = [decode_step_times(model, batch, config.decode_prompt, config.decode_tokens) for _ in range(config.repeats)]
        key = str(batch)
        tokens_per_s[key] = statistics.median(batch * len(run) / sum(run) for run in runs)
        steps_ms = [s * 1000 for run in runs for s in run]
        p50[key], p95[key], all_steps[key] = percentile(steps_ms, 50), percentile(steps_ms, 95), steps_ms
    return SpeedResult(prefill, tokens_per_s, p50, p95, all_steps, asdict(config), str(model.dtype).removeprefix("torch."))
