"""The one sampler: greedy, temperature, top-k and top-p, with a seeded generator on the logits' device.

``Sampler.probs`` gives the distribution a token is drawn from (speculative decoding's rejection
sampling needs it); ``Sampler.sample`` draws from it, or takes the argmax when greedy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from leanlm.errors import LeanLMError


@dataclass
class SamplingConfig:
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; else softmax temperature"})
    top_k: int = field(default=50, metadata={"help": "keep the k likeliest tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "keep the smallest set with this total probability"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling generator"})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise LeanLMError(f"sampling needs temperature >= 0, top_k >= 0 and top_p in (0, 1], got "
                              f"{self.temperature}, {self.top_k}, {self.top_p}")


class Sampler:
    """Draws next tokens under one ``SamplingConfig``; its generator lives on the logits' device."""

    def __init__(self, config: SamplingConfig | None = None):
        self.config = config or SamplingConfig()
        self.config.validate()
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[device]

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., vocab) logits → (..., vocab) float32 probabilities after temperature, top-k and top-p.

        Greedy gives a one-hot distribution on the argmax.
        """
        logits = logits.float()
        if self.config.greedy:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        logits = logits / self.config.temperature
        k = self.config.top_k
        if 0 < k < logits.shape[-1]:
            kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.config.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            sorted_probs = ordered.softmax(-1)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the likelier tokens
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, mass_before >= self.config.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) logits → (batch,) token ids."""
        if self.config.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits))

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """(batch, vocab) probabilities → (batch,) token ids drawn with this sampler's generator."""
        return torch.multinomial(probs, 1, generator=self.generator(probs.device))[:, 0]


def sample_rows(samplers: list[Sampler], logits: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) logits with one ``Sampler`` per row → (batch,) ids.

    A server's batch mixes requests with their own settings and seeds: greedy rows take one batched
    argmax; each sampling row draws with its own sampler (its own seeded generator), so a request's
    tokens do not depend on which other requests share its steps.
    """
    if len(samplers) != logits.shape[0]:
        raise LeanLMError(f"one sampler per row: {len(samplers)} samplers for {logits.shape[0]} rows")
    tokens = logits.argmax(-1)  # (batch,)
    for row, sampler in enumerate(samplers):
        if not sampler.config.greedy:
            tokens[row] = sampler.sample(logits[row: row + 1])[0]
    return tokens
