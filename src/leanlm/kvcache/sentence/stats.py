"""Reporting: bytes in each tier and the traffic between them, summed over a cache's layers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from leanlm.kvcache.base import PolicyCache


@dataclass
class TierStats:
    fast_bytes: int  # held in the fast tier now, all layers
    slow_bytes: int  # held in the slow tier now
    fetched_bytes: int  # moved slow → fast so far
    written_bytes: int  # moved fast → slow so far
    decode_steps: int  # single-token steps (generated tokens)
    moved_per_decode_token: float  # mean bytes moved (both ways) per single-token step, all layers

    def to_dict(self) -> dict:
        return asdict(self)


def tier_stats(cache: PolicyCache) -> TierStats:
    """Bytes in each tier and the traffic between them, summed over a SentenceTier cache's layers."""
    layers = [layer for layer in cache.layers if hasattr(layer, "fast_nbytes")]  # not the model's own sliding windows
    decode = [entry for layer in layers for entry in layer.log if entry.new == 1]
    steps = len(decode) // max(1, len(layers))
    moved = sum(entry.fetched + entry.written for entry in decode)
    return TierStats(sum(layer.fast_nbytes() for layer in layers), sum(layer.slow_nbytes() for layer in layers),
                     sum(layer.fetched_bytes for layer in layers), sum(layer.written_bytes for layer in layers),
                     steps, moved / steps if steps else 0.0)
