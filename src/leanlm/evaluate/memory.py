"""Memory facts: KV-cache bytes per token (analytic and measured), weight bytes, parameters, peak RSS."""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass

import torch

from leanlm.analyze.kv_budget import analytic_kv_bytes_per_token
from leanlm.models import ModelSpec
from leanlm.models.weights import param_count, weight_bytes


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a transformers Cache holds (keys and values of each layer, plus any extras)."""
    tensors = []
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                tensors.append(value)
    return tensors


def measured_kv_bytes_per_token(model, num_tokens: int = 64) -> float:
    """Run a forward pass over `num_tokens` tokens and count the bytes the returned cache holds, per token."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, num_tokens), generator=torch.Generator().manual_seed(0))  # CPU, moved below
    with torch.inference_mode():
        cache = model(ids.to(device), use_cache=True, logits_to_keep=1).past_key_values
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache)) / num_tokens


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class MemoryReport:
    kv_bytes_per_token: float  # measured from a real cache
    kv_bytes_per_token_analytic: float  # 2 x sum_l kv_heads_l x head_dim x bytes
    kv_cache_dtype: str
    weight_bytes: int
    params: int
    peak_rss_mb: float

    def to_dict(self) -> dict:
        return asdict(self)


def memory_report(model) -> MemoryReport:
    spec = ModelSpec.from_model(model)
    dtype = model.dtype  # the cache is kept in the model's dtype
    return MemoryReport(
        kv_bytes_per_token=measured_kv_bytes_per_token(model),
        kv_bytes_per_token_analytic=float(_analytic(model, spec, torch.finfo(dtype).bits // 8)),
        kv_cache_dtype=str(dtype).removeprefix("torch."),
        weight_bytes=weight_bytes(model),
        params=param_count(model),
        peak_rss_mb=peak_rss_mb(),
    )


def _analytic(model, spec: ModelSpec, dtype_bytes: int) -> int:
    """2 x kv_heads x head_dim per layer, or for a latent-KV model (transforms/latent_kv) rank + kv_heads x 2r."""
    latent = getattr(model.config, "leanlm_latent_kv", None)
    if latent is None:
        return analytic_kv_bytes_per_token(spec, dtype_bytes)
    rope = 2 * latent["rope_pairs"]
    return sum(rank + kv * rope for rank, kv in zip(latent["rank_per_layer"], spec.kv_heads_per_layer)) * dtype_bytes
