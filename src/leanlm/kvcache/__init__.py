"""Run-time KV-cache policies: each a transformers Cache whose layers really hold fewer bytes."""

from __future__ import annotations

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import CachePolicy, FullPrecisionLayer, PolicyCache, PolicyLayer, attach, tensor_bytes
from leanlm.kvcache.heavy_hitter import HeavyHitter
from leanlm.kvcache.observation_window import ObservationWindow
from leanlm.kvcache.quantized import Quantized
from leanlm.kvcache.sentence_tier import SentenceTier
from leanlm.kvcache.sink_window import SinkWindow

CACHE_POLICIES: dict[str, type[CachePolicy]] = {
    policy.name: policy for policy in (Quantized, SinkWindow, HeavyHitter, ObservationWindow, SentenceTier)
}


def make_policy(name: str, budget: float, context: int, **settings) -> CachePolicy:
    """A policy holding ``budget`` × the full cache bytes of ``context`` tokens.

    ``name`` is a registered policy, optionally with ``+int8``/``+int4``/``+int2`` for eviction
    policies that store their kept tokens quantized (e.g. ``heavy_hitter+int4``).
    """
    base, _, suffix = name.partition("+")
    if base not in CACHE_POLICIES:
        raise LeanLMError(f"unknown KV-cache policy '{name}': choose from {', '.join(CACHE_POLICIES)}")
    if suffix:
        if base == "quantized" or suffix not in ("int8", "int4", "int2"):
            raise LeanLMError(f"'{name}': only eviction policies combine with +int8, +int4 or +int2")
        settings["bits"] = int(suffix[3:])
    return CACHE_POLICIES[base].for_budget(budget, context, **settings)


__all__ = ["CACHE_POLICIES", "CachePolicy", "FullPrecisionLayer", "HeavyHitter", "ObservationWindow", "PolicyCache",
           "PolicyLayer", "Quantized", "SinkWindow", "attach", "make_policy", "tensor_bytes"]
