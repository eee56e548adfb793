"""Analyze: head importance scorers (KL utility, magnitude, Taylor), head gates, KV budget calculator.

Every scorer returns a HeadScores (higher = more important) for each query head and each KV group.
"""

from __future__ import annotations

import logging

from torch import nn

from leanlm.analyze.head_gates import ablation_gates, head_gates, split_gates
from leanlm.analyze.kl_utility import KLUtilityScorer
from leanlm.analyze.kv_budget import KVBudgetRow, analytic_kv_bytes_per_token, format_kv_table, kv_budget
from leanlm.analyze.magnitude import MagnitudeScorer
from leanlm.analyze.scoring import HeadScorer, HeadScores, kv_groups
from leanlm.analyze.taylor import TaylorScorer
from leanlm.errors import LeanLMError

log = logging.getLogger(__name__)

SCORERS: dict[str, type[HeadScorer]] = {
    KLUtilityScorer.name: KLUtilityScorer,
    MagnitudeScorer.name: MagnitudeScorer,
    TaylorScorer.name: TaylorScorer,
}


def score_heads(
    model: nn.Module,
    tokenizer,
    scorers: list[str],
    num_samples: int = 8,
    seq_len: int = 128,
    batch_size: int = 4,
    seed: int = 0,
    data=None,
    source: str | None = None,
) -> dict[str, HeadScores]:
    """Run each named scorer on the same calibration batches of ``data`` (default WikiText-2 *validation*).

    ``data``: a spec string, recipe list or ``DataMix`` (``leanlm.data.sources``); ``source`` names
    ``model`` for the ``teacher`` source (text sampled from the model being scored).

    Default calibration is 8 × 128 tokens: the KL scorer's cost is one partial forward per head
    and per KV group (360 on SmolLM2-135M), so it scales with the calibration tokens.
    """
    from leanlm.data import calibration_batches  # reads the data only when called
    from leanlm.data.sources import DataMix

    if not scorers:
        raise LeanLMError(f"choose at least one scorer from {', '.join(SCORERS)}")
    unknown = [name for name in scorers if name not in SCORERS]
    if unknown:
        raise LeanLMError(f"unknown scorer '{','.join(unknown)}': choose from {', '.join(SCORERS)}")
    mix = DataMix.parse(data)
    batches = calibration_batches(tokenizer, num_samples, seq_len, batch_size, seed, data=mix, model=source, loaded=model)
    results = {}
    for name in scorers:
        results[name] = SCORERS[name]().score(model, batches)
        if results[name].calibration.get("num_samples"):  # a data-driven score: say what it read
            results[name].calibration |= {"split": "validation" if mix.label() == "wikitext" else None,
                                          "data": mix.describe()}
        log.info("scored heads with %s in %.1f s", name, results[name].seconds)
    return results


__all__ = [
    "SCORERS",
    "HeadScorer",
    "HeadScores",
    "KLUtilityScorer",
    "KVBudgetRow",
    "MagnitudeScorer",
    "TaylorScorer",
    "ablation_gates",
    "analytic_kv_bytes_per_token",
    "format_kv_table",
    "head_gates",
    "kv_budget",
    "kv_groups",
    "score_heads",
    "split_gates",
]
