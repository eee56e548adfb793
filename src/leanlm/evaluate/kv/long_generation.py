"""4. Long generation: decode many tokens one at a time, sampling cache bytes, RSS and time."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leanlm.engine.decode import stream
from leanlm.engine.sampling import Sampler, SamplingConfig
from leanlm.errors import LeanLMError
from leanlm.models.device import synced_clock
from leanlm.evaluate.kv.common import (PolicyArg, dtype_name, encode_text, cache_held_tokens, cache_nbytes, cache_total_nbytes,
                                      describe_policy, open_cache, resolve_policy)

DEFAULT_PROMPT = ("Chapter 1\n\nThe old lighthouse keeper had not spoken to anyone for three winters. "
                  "On the morning the supply boat failed to arrive, he")


@dataclass
class LongGenerationProtocol:
    """Decode ``new_tokens`` tokens one at a time, sampling cache bytes, RSS and time as it goes.

    Past the model's trained length (8192 for SmolLM2) only a policy that keeps positions inside it
    stays sane: pass ``SinkWindow(..., position_mode="cache")``. The loop never stops early (an
    end-of-text token is just another token) and keeps nothing that grows with the tokens.
    """

    new_tokens: int = field(default=16384, metadata={"help": "tokens to generate"})
    sample_every: int = field(default=256, metadata={"help": "record bytes, RSS and time every N tokens"})
    prompt: str = field(default=DEFAULT_PROMPT, metadata={"help": "text the generation continues"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature; 0 = greedy"})
    top_k: int = field(default=50, metadata={"help": "sample among the k likeliest tokens; 0 = all"})
    seed: int = field(default=0, metadata={"help": "seeds the sampler"})
    prefill_chunk: int = field(default=512, metadata={"help": "prompt tokens per prefill forward"})

    def validate(self) -> None:
        if self.new_tokens < 1 or self.sample_every < 1 or self.prefill_chunk < 1:
            raise LeanLMError("long generation needs new_tokens, sample_every and prefill_chunk of at least 1")
        if self.temperature < 0 or self.top_k < 0:
            raise LeanLMError(f"temperature and top_k must be >= 0, got {self.temperature}, {self.top_k}")
        if not self.prompt:
            raise LeanLMError("long generation needs a non-empty prompt")


@dataclass
class LongGenerationResult:
    steps: list[int]  # tokens generated at each sample
    cache_bytes: list[int]  # resident cache bytes at each sample (a two-tier cache: its fast tier)
    total_bytes: list[int]  # fast + slow tier bytes at each sample
    held_tokens: list[int]
    rss_mib: list[float]  # process resident set size at each sample
    seconds: list[float]  # decode time since the first generated token
    tokens_per_s: float  # generated tokens / decode seconds (prefill excluded)
    prompt_tokens: int
    text_head: str  # the first and last 64 generated tokens, to eyeball degeneration
    text_tail: str
    policy: dict
    protocol: dict

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def long_generation(model, tokenizer, policy: PolicyArg = None,
                    protocol: LongGenerationProtocol | None = None) -> LongGenerationResult:
    """Generate ``protocol.new_tokens`` tokens through ``policy``, recording memory every ``sample_every``."""
    protocol = protocol or LongGenerationProtocol()
    protocol.validate()
    prompt = torch.tensor(encode_text(tokenizer, protocol.prompt), dtype=torch.long)
    resolved = resolve_policy(policy, len(prompt) + protocol.new_tokens)
    device = next(model.parameters()).device
    sampler = Sampler(SamplingConfig(temperature=protocol.temperature, top_k=protocol.top_k, seed=protocol.seed))
    steps, nbytes, totals, held, rss, seconds = [], [], [], [], [], []
    head, tail = [], deque(maxlen=64)
    with torch.inference_mode(), open_cache(model, resolved) as cache:
        # The engine's one decode loop. It yields token k before feeding it, so ask for one token more:
        # when token k + 1 arrives, the cache has taken exactly k generated tokens (the extra one is dropped).
        tokens = stream(model, prompt[None].to(device), protocol.new_tokens + 1, cache=cache, sampling=sampler,
                        prefill_chunk=protocol.prefill_chunk)
        bar = tqdm(total=protocol.new_tokens, desc=f"generate ({resolved.name if resolved else 'none'})", unit="tok", leave=False)
        for fed, token in enumerate(tokens):  # ``fed`` generated tokens are in the cache when this one arrives
            if fed == 0:
                start = synced_clock(device)  # after the prefill: decode time only
            elif fed % protocol.sample_every == 0 or fed == protocol.new_tokens:
                steps.append(fed)
                nbytes.append(cache_nbytes(cache))
                totals.append(cache_total_nbytes(cache))
                held.append(cache_held_tokens(cache))
                rss.append(_rss_mib())
                seconds.append(synced_clock(device) - start)
            if fed == protocol.new_tokens:
                break
            if len(head) < 64:
                head.append(int(token[0]))
            tail.append(int(token[0]))
            bar.update(1)
        bar.close()
    record = {"name": "long_generation", **asdict(protocol), "dtype": dtype_name(model), "bos": False}
    return LongGenerationResult(
        steps=steps, cache_bytes=nbytes, total_bytes=totals, held_tokens=held, rss_mib=rss, seconds=seconds,
        tokens_per_s=protocol.new_tokens / seconds[-1], prompt_tokens=len(prompt),
        text_head=tokenizer.decode(head), text_tail=tokenizer.decode(list(tail)),
        policy=describe_policy(resolved), protocol=record,
    )


def plot_long_generation(result: LongGenerationResult | dict, path: str | Path) -> None:
    """Cache MiB and process RSS MiB against generated tokens (one result, two stacked panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = result.to_dict() if isinstance(result, LongGenerationResult) else result
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(data["steps"], [b / 2**20 for b in data["cache_bytes"]], marker=".", linewidth=1)
    top.set_ylabel("KV cache (MiB)")
    bottom.plot(data["steps"], data["rss_mib"], marker=".", linewidth=1, color="tab:orange")
    bottom.set_ylabel("process RSS (MiB)")
    bottom.set_xlabel("generated tokens")
    for ax in (top, bottom):
        ax.set_ylim(bottom=0)  # a flat cache should look flat, not zoomed into noise
        ax.grid(alpha=0.3)
    top.set_title(f"long generation, policy {data['policy'].get('policy')}: {data['tokens_per_s']:.1f} tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
