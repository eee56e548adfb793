"""What a transform needs besides the model, built on request: calibration batches and head scores.

The pipeline and ``leanlm prune`` call ``transform_context`` with the model *as it is when the
transform starts* (after earlier transforms), so head scores always match the heads still there.
Calibration text is the ``data`` setting (``leanlm.data.sources``; WikiText-2 validation by default,
never the test split that perplexity reports on).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from leanlm.analyze import SCORERS
from leanlm.data import calibration_batches
from leanlm.errors import LeanLMError
from leanlm.models import parse_dtype
from leanlm.transforms.base import Transform


@dataclass
class CalibrationSettings:
    """Calibration windows for scorers (head scores, Block Influence, MLP channel scores)."""

    samples: int = field(default=8, metadata={"help": "windows drawn from the data (default WikiText-2 validation)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per window"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of the window draw"})

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise LeanLMError("calibration needs samples >= 1, seq_len >= 2 and batch_size >= 1")


def transform_context(transform: Transform, model: nn.Module, tokenizer, calibration: CalibrationSettings,
                      score_dtype: str = "bfloat16", data=None, source: str | None = None, teacher=None) -> dict:
    """The keyword arguments ``transform.apply`` needs (its ``needs``), computed on ``model``.

    ``data`` (a spec or ``DataMix``) gives the calibration text; ``source`` / ``teacher`` name and
    hold the original model (what the ``teacher`` source samples from; ``model`` when not given).

    Head scores run on a copy in ``score_dtype`` (bfloat16 is several times faster on CPU and GPU);
    the transform itself changes ``model`` in its own dtype.
    """
    context: dict = {}
    if "tokenizer" in transform.needs:
        context["tokenizer"] = tokenizer
    if not {"calibration", "scores"} & set(transform.needs):
        return context
    batches = calibration_batches(tokenizer, num_samples=calibration.samples, seq_len=calibration.seq_len,
                                  batch_size=calibration.batch_size, seed=calibration.seed, data=data, model=source,
                                  loaded=teacher if teacher is not None else model)
    if "calibration" in transform.needs:
        context["calibration"] = batches
    if "scores" in transform.needs:
        scorer = getattr(transform, "scorer", None)
        if scorer not in SCORERS:
            raise LeanLMError(f"{transform.name} needs head scores but names no known scorer ({', '.join(SCORERS)})")
        scoring_copy = copy.deepcopy(model).to(parse_dtype(score_dtype)).eval()
        context["scores"] = SCORERS[scorer]().score(scoring_copy, batches)
        del scoring_copy
    return context
