"""Typed recipes: YAML -> dataclasses, with every mistake reported at once.

A recipe names the model, the device, and each step of the pipeline:
load -> baseline eval -> each transform in order (with its own eval) -> recover -> merge -> eval -> export -> report.

    transforms:
      - {name: prune_layers, num_layers: 2}
      - {name: prune_heads, fraction: 0.25, granularity: kv_group, scorer: kl}
      - {name: prune_mlp, fraction: 0.1}
    data: teacher@0.5,wikitext@0.5      # calibration and training text (syntax: leanlm.data_syntax), or a list:
    data: [{source: teacher, weight: 0.5, tokens: 80000}, {source: wikitext, weight: 0.5}]
    recover: {data: teacher}            # training text only (calibration keeps `data:`)
    eval: {texts: [pride, notes.txt]}   # more evaluation texts (files or built-in novels), same protocol

Each item is built through the ``TRANSFORMS`` registry (its settings are the transform's own
dataclass fields); ``recover.distill`` *is* a ``DistillConfig`` and ``recover.lora`` a
``LoraSettings``, so every training setting (``weight_decay``, ``max_grad_norm``, ``seed``...) can be
set. Allowed values live next to the code that uses them (field metadata ``choices``).
Unknown keys are errors (a typo must not silently fall back to a default).

Old recipes (``score:`` + ``prune:`` sections) are read as ``calibration:`` + a one-item
``transforms: [prune_heads]`` list (see ``upgrade_legacy``), with a logged note on how to update.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from leanlm.data.sources import DEFAULT_DATA, DataMix
from leanlm.data.texts import check_text
from leanlm.errors import LeanLMError
from leanlm.evaluate.perplexity import METHODS
from leanlm.models import DEVICES
from leanlm.recover import DistillConfig, LoraSettings
from leanlm.recover.local_stage import LocalStageConfig
from leanlm.settings import build, choices, to_plain
from leanlm.transforms import Transform, transform_from_dict
from leanlm.transforms.context import CalibrationSettings

log = logging.getLogger(__name__)

TRAIN_DTYPES = ("bfloat16", "float32")
VARIANTS = ("lora_kd", "kd_oproj")  # recovery runs; their titles are in pipeline.VARIANT_TITLES


@dataclass
class EvalStep:
    method: str = field(default="sliding", metadata=choices(METHODS, "perplexity protocol"))
    window: int = field(default=1024, metadata={"help": "tokens per window"})
    stride: int = field(default=512, metadata={"help": "sliding window step"})
    max_tokens: int | None = field(default=16384, metadata={"help": "first N test tokens (null = all)"})
    speed: bool = field(default=True, metadata={"help": "time prefill and decode"})
    speed_repeats: int = field(default=3, metadata={"help": "timed runs per speed number"})
    ood: bool = field(default=True, metadata={"help": "also score out-of-domain text (not WikiText)"})
    texts: list[str] = field(default_factory=list, metadata={"help": "more evaluation texts: UTF-8 files or built-in "
                                                                       "names (botchan, pride), same protocol"})

    def __post_init__(self) -> None:
        for name in self.texts:
            check_text(name)


@dataclass
class RecoverStep:
    lora: LoraSettings = field(default_factory=LoraSettings)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dtype: str = field(default="bfloat16", metadata=choices(TRAIN_DTYPES, "weights of student and teacher while "
                                                                         "training; bfloat16 is ~3x faster where the CPU has a bf16 GEMM, and "
                                                                         "close to float32 elsewhere (widened, models/widen.py)"))
    eval_tokens: int = field(default=4096, metadata={"help": "test tokens for the in-training perplexity curve"})
    variants: list[str] = field(
        default_factory=lambda: ["lora_kd"],
        metadata=choices(VARIANTS, "recovery runs from the same pruned model: lora_kd, kd_oproj (KD, only o_proj trains)"),
    )
    data: str | list | None = field(default=None, metadata={"help": "training text; null = the recipe's data"})
    local: LocalStageConfig = field(
        default_factory=lambda: LocalStageConfig(method="none"),
        metadata={"help": "layer-local stage before KD: each pruned layer's attention fitted to the teacher's on the "
                          "first training windows (method lstsq | adam | none); its CPU time counts in max_cpu_minutes"})

    def __post_init__(self) -> None:
        self.distill.check()
        self.local.check()
        self.lora.check()
        if self.data is not None:
            DataMix.parse(self.data)  # a bad spec or a missing file is reported with the recipe's problems
        if self.distill.out_dir is not None:
            raise LeanLMError("'recover.distill.out_dir' is set by the pipeline (the run directory); remove it")


@dataclass
class ExportStep:
    enabled: bool = True
    padded: bool = field(default=True, metadata={"help": "per-layer layouts: also write a stock-loadable padded copy"})


@dataclass
class Recipe:
    name: str
    model: str = "smollm2-135m"
    dtype: str = field(default="bfloat16", metadata=choices(TRAIN_DTYPES, "evaluation (and head scoring) dtype"))
    device: str = field(default="auto", metadata=choices(DEVICES, "where the model runs; auto = CUDA when present"))
    data: str | list = field(default=DEFAULT_DATA, metadata={"help": "calibration and training text: a spec string "
                                                                    "('teacher@0.5,wikitext@0.5') or a list of "
                                                                    "{source: ..., weight: ...} items"})
    eval: EvalStep = field(default_factory=EvalStep)
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    transforms: list[Transform] = field(default_factory=list)
    recover: RecoverStep | None = field(default_factory=RecoverStep)
    export: ExportStep = field(default_factory=ExportStep)

    def to_dict(self) -> dict:
        """The recipe as YAML-able data; ``load_recipe`` of its YAML gives the same recipe."""
        data = {key: value for key, value in to_plain(self).items() if key != "transforms"}
        # settings added later are left out at their defaults, so runs started before them still resume
        if data["data"] == DEFAULT_DATA:
            del data["data"]
        if data["recover"] is not None and data["recover"]["data"] is None:
            del data["recover"]["data"]
        if not data["eval"]["texts"]:
            del data["eval"]["texts"]
        return {**data, "transforms": [t.to_dict() for t in self.transforms]}


def _transforms(value, where: str, errors: list[str]) -> list[Transform] | None:
    if not isinstance(value, list):
        errors.append(f"'{where}' must be a list of {{name: ..., settings}} items, got {value!r}")
        return None
    built = [transform_from_dict(item, f"{where}[{i}]", errors) for i, item in enumerate(value)]
    return None if any(t is None for t in built) else built


def _data(value, where: str, errors: list[str]):
    """The recipe's ``data:`` checked (spec parsed, files there) and kept as written (the config round-trips)."""
    try:
        DataMix.parse(value)
    except LeanLMError as err:
        errors.append(f"'{where}': {err}")
        return None
    return value


LEGACY_HINT = (
    "replace the 'score:' and 'prune:' sections by 'calibration: {{samples: {samples}, seq_len: {seq_len}, seed: {seed}}}' "
    "and 'transforms: [{{name: prune_heads, fraction: {fraction}, layout: {layout}, granularity: {granularity}, "
    "scorer: {scorer}}}]'; move 'recover.distill.dtype' and 'recover.distill.eval_tokens' to 'recover.dtype' and "
    "'recover.eval_tokens'"
)
LEGACY_SCORE = {"scorer": "scorer", "calib_samples": "samples", "calib_len": "seq_len", "seed": "seed"}
LEGACY_PRUNE = ("fraction", "layout", "granularity")
LEGACY_DISTILL = ("dtype", "eval_tokens")  # keys that moved from recover.distill to recover


def upgrade_legacy(data: dict, errors: list[str]) -> tuple[dict, str | None]:
    """Translate an old recipe (``score:`` / ``prune:`` sections) to the transforms form.

    Returns the new mapping and the update hint (None when the recipe is already new). Unknown keys
    inside the old sections are reported under their old names.
    """
    if not isinstance(data, dict) or not {"score", "prune"} & set(data):
        return data, None
    data = copy.deepcopy(data)
    if "transforms" in data or "calibration" in data:
        errors.append("a recipe has either 'transforms:' + 'calibration:' or the old 'score:' + 'prune:' sections, not both")
        return data, None
    score, prune = data.pop("score", None) or {}, data.pop("prune", None) or {}
    for section, mapping, known in (("score", score, LEGACY_SCORE), ("prune", prune, LEGACY_PRUNE)):
        if not isinstance(mapping, dict):
            errors.append(f"'{section}' must be a mapping, got {type(mapping).__name__}")
            return data, None
        errors += [f"unknown key '{section}.{key}' (expected one of: {', '.join(known)})" for key in mapping if key not in known]
    item = {"name": "prune_heads", **{k: prune[k] for k in LEGACY_PRUNE if k in prune}, "scorer": score.get("scorer", "kl")}
    data["transforms"] = [item]
    data["calibration"] = {new: score[old] for old, new in LEGACY_SCORE.items() if old in score and new != "scorer"}
    distill = (data.get("recover") or {}).get("distill") if isinstance(data.get("recover"), dict) else None
    if isinstance(distill, dict):
        for key in LEGACY_DISTILL:
            if key in distill:
                data["recover"][key] = distill.pop(key)
    defaults = {**CalibrationSettings().__dict__, **Transform.from_dict({"name": "prune_heads"}).to_dict()}
    hint = LEGACY_HINT.format(**{**defaults, **data["calibration"], **item})
    return data, hint


def _check_moved_keys(data: dict, errors: list[str]) -> None:
    """In a new-format recipe, say where the keys that left ``recover.distill`` went."""
    recover = data.get("recover") if isinstance(data, dict) else None
    distill = recover.get("distill") if isinstance(recover, dict) else None
    if isinstance(distill, dict):
        for key in LEGACY_DISTILL:
            if key in distill:
                errors.append(f"'recover.distill.{key}' moved to 'recover.{key}'")
                distill.pop(key)


def _legacy_names(error: str) -> str:
    renames = {"'transforms[0].scorer'": "'score.scorer'", "'transforms[0]": "'prune", "transforms[0]:": "prune:",
               "'calibration.samples'": "'score.calib_samples'", "'calibration.seq_len'": "'score.calib_len'",
               "'calibration.seed'": "'score.seed'", "calibration:": "score:"}
    for new, old in renames.items():
        error = error.replace(new, old)
    return error


def parse_recipe(data, source: str = "recipe") -> Recipe:
    """Validate recipe data (a YAML mapping); raise one LeanLMError listing every problem."""
    errors: list[str] = []
    data, hint = upgrade_legacy(data, errors)
    if hint is None and isinstance(data, dict):
        data = copy.deepcopy(data)
        _check_moved_keys(data, errors)
    recipe = build(Recipe, data, "", errors, nested={"transforms": _transforms, "data": _data})
    if errors and hint:  # name the problems of an old recipe by its own section names
        errors = [_legacy_names(error) for error in errors]
    if errors:
        suffix = f" (this recipe uses the old format; to update it: {hint})" if hint else ""
        raise LeanLMError(f"{source} has {len(errors)} problem(s): " + "; ".join(errors) + suffix)
    if hint:
        log.warning("%s uses the old score:/prune: format, read as one prune_heads transform; to update it: %s",
                    source, hint)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe; raise one LeanLMError listing every problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise LeanLMError(f"cannot read recipe '{path}': {err.strerror}") from err
    except yaml.YAMLError as err:
        raise LeanLMError(f"recipe '{path}' is not valid YAML: {str(err).splitlines()[0]}") from err
    return parse_recipe(data, f"recipe '{path}'")


__all__ = ["VARIANTS", "EvalStep", "ExportStep", "Recipe", "RecoverStep", "load_recipe", "parse_recipe"]
