"""Run-time KV-cache policies: each a transformers Cache whose layers really hold fewer bytes."""

from __future__ import annotations

import dataclasses
import typing

from leanlm.errors import LeanLMError
from leanlm.kvcache.base import (CachePolicy, FullPrecisionLayer, PolicyCache, PolicyLayer, attach, hooked, new_cache,
                               tensor_bytes)
from leanlm.kvcache.eviction import model_head_dim
from leanlm.kvcache.heavy_hitter import HeavyHitter
from leanlm.kvcache.observation_window import ObservationWindow
from leanlm.kvcache.quantized import Quantized
from leanlm.kvcache.sentence import SentenceTier
from leanlm.kvcache.sink_window import SinkWindow

CACHE_POLICIES: dict[str, type[CachePolicy]] = {
    policy.name: policy for policy in (Quantized, SinkWindow, HeavyHitter, ObservationWindow, SentenceTier)
}


def parse_policy(spec: str) -> tuple[str, dict]:
    """``"name[:key=value,key=value]"`` → (name, settings); values become int, float or str.

    E.g. ``sentence_tier:max_sentence=32,coarse=mean`` or ``sink_window+int4:sink=8``.
    """
    name, _, rest = spec.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise LeanLMError(f"'{spec}': settings go as key=value after a colon, e.g. 'sentence_tier:coarse=mean'")
        settings[key.strip()] = _setting_value(value.strip())
    return name.strip(), settings


def _setting_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _check_setting_types(spec: str, cls: type[CachePolicy], settings: dict) -> None:
    """A setting whose field is a number must be given as one (``bits=abc`` is refused in one sentence)."""
    hints = typing.get_type_hints(cls) | {"group": int, "bits": int, "head_dim": int}
    for key, value in settings.items():
        allowed = {t for t in typing.get_args(hints.get(key)) or (hints.get(key),) if t in (int, float)}
        if not allowed or isinstance(value, bool):
            continue
        if not isinstance(value, tuple(allowed | ({int} if float in allowed else set()))):
            kind = "an integer" if allowed == {int} else "a number"
            raise LeanLMError(f"'{spec}': {key} must be {kind}, got '{value}'")


def make_policy(name: str, budget: float, context: int, tokenizer=None, model=None, **settings) -> CachePolicy:
    """A policy holding ``budget`` × the full cache bytes of ``context`` tokens.

    ``name`` is a registered policy, optionally with ``+int8``/``+int4``/``+int2`` for eviction
    policies that store their kept tokens quantized (e.g. ``heavy_hitter+int4``), and settings after
    a colon (``parse_policy``). ``tokenizer`` lets text-aware policies (sentence_tier: sentence
    boundaries) read the token stream. ``model`` (a model or its config) gives the ``head_dim`` that
    sizing needs when a policy keeps bookkeeping per token (heavy_hitter's scores).
    """
    spec, (name, parsed) = name, parse_policy(name)
    settings = parsed | settings
    base, _, suffix = name.partition("+")
    if base not in CACHE_POLICIES:
        raise LeanLMError(f"unknown KV-cache policy '{name}': choose from {', '.join(CACHE_POLICIES)}")
    if suffix:
        if base == "quantized":
            raise LeanLMError(f"'{name}': quantized is already quantized; set its width as quantized:bits=4")
        if suffix not in ("int8", "int4", "int3", "int2"):
            raise LeanLMError(f"'{name}': the stored width must be +int8, +int4, +int3 or +int2, not +{suffix}")
        settings["bits"] = int(suffix[3:])
    if model is not None:
        settings.setdefault("head_dim", model_head_dim(model))
    fields = [f.name for f in dataclasses.fields(CACHE_POLICIES[base])] + ["group", "bits", "head_dim"]  # for_budget reads these
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise LeanLMError(f"'{spec}': unknown setting(s) {', '.join(unknown)}; {base} settings are: {', '.join(fields)}")
    cls = CACHE_POLICIES[base]
    _check_setting_types(spec, cls, settings)
    if tokenizer is not None and hasattr(cls, "use_tokenizer"):
        settings["tokenizer"] = tokenizer  # before sizing: what the policy keeps may depend on it
    return cls.for_budget(budget, context, **settings)


__all__ = ["CACHE_POLICIES", "CachePolicy", "FullPrecisionLayer", "HeavyHitter", "ObservationWindow", "PolicyCache",
           "PolicyLayer", "Quantized", "SinkWindow", "attach", "hooked", "make_policy", "new_cache", "parse_policy", "tensor_bytes"]
