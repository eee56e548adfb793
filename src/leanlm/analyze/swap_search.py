"""PostNAS search: which attention layers can become bounded (sliding-window / linear), and with what.

1. Sensitivity: for every layer and every candidate replacement (e.g. ``sliding_window:window=128``,
   ``linear``), swap only that layer (after a short layer-local fit when the replacement has new
   parameters: ``recover.layer_local``), and measure on validation windows the KL to the original's
   next-token distribution (positions from ``score_from`` on, where a window actually cuts context)
   and, on passkey prompts, how many nats of answer log-likelihood are lost (the mean over the prompts). Each layer gets the
   candidate with the lowest cost = KL + ``passkey_weight`` × passkey nats lost (with ``slack``: the
   first candidate, options going from the smallest cache to the largest, within ``slack`` of it).
2. Greedy: layers in order of cost (ties by index); take ``count`` of them, or as many as keep the
   summed cost ≤ ``epsilon`` and then, measured together, the real KL ≤ ``epsilon`` (dropping the last
   added while it is not); ``keep`` layers always keep full attention. With ``passkey_budget`` (count
   mode), a layer joins only if the set with it, measured together on the passkey prompts, loses at most
   that many nats of answer log-likelihood: single-layer drops do not add up (a set of layers that each
   lose < 0.6 nats lost the 4K passkey together).
3. The result names every kept layer and why (its cost and rank), and writes a recipe: one
   ``swap_attention`` item per distinct candidate.

Deterministic for a seed: the window draw, the fits and the tie-breaks depend on it alone.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.kvcache import parse_policy
from leanlm.models import arch_of
from leanlm.models.widen import widened_linears
from leanlm.recover.layer_local import LocalFitConfig, capture_attention_io, capture_io, fit_module
from leanlm.transforms.swap_attention import REPLACEMENTS, SWAP_KEY, make_settings, swap_layer

log = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    options: tuple[str, ...] = field(default=("sliding_window:window=128", "linear", "sliding_window:window=512"),
                                     metadata={"help": "candidate replacements, 'kind[:key=value,...]', from the smallest "
                                                       "cache to the largest"})
    score_from: int = field(default=512, metadata={"help": "KL is scored from this position of each window on"})
    epsilon: float = field(default=0.1, metadata={"help": "total KL budget (nats/token) of the swapped set"})
    count: int | None = field(default=None, metadata={"help": "swap exactly this many layers instead of using epsilon"})
    keep: int = field(default=1, metadata={"help": "layers that always keep full attention"})
    passkey_weight: float = field(default=0.02, metadata={"help": "KL nats charged per nat of passkey log-likelihood lost"})
    passkey_budget: float | None = field(default=None, metadata={"help": "count mode: add a layer only while the swapped "
                                                                         "set together loses at most this many nats of "
                                                                         "passkey answer log-likelihood (mean over prompts)"})
    fit_steps: int = field(default=10, metadata={"help": "layer-local Adam steps for replacements with new parameters"})
    fit_lr: float = field(default=3e-3, metadata={"help": "layer-local learning rate"})
    slack: float = field(default=0.0, metadata={"help": "per layer, take the first option (smallest cache first) whose "
                                                        "cost is within this of the layer's cheapest"})
    seed: int = field(default=0, metadata={"help": "seeds the fits (and the window draw of search_model)"})

    def __post_init__(self) -> None:
        for option in self.options:
            kind, settings = parse_policy(option)
            make_settings(kind, settings)  # unknown kind / bad window: one LeanLMError
        if self.keep < 0 or (self.count is not None and self.count < 0) or self.epsilon < 0:
            raise LeanLMError("search needs keep >= 0, count >= 0 and epsilon >= 0")
        if self.passkey_budget is not None and self.passkey_budget < 0:
            raise LeanLMError(f"passkey_budget must be >= 0 nats, got {self.passkey_budget}")


@dataclass
class Passkey:
    """One retrieval prompt: its token ids and the answer's (teacher-forced log-likelihood is scored)."""

    ids: list[int]
    answer: list[int]


@dataclass
class SearchResult:
    table: list[dict]  # per layer: {"layer", "option", "cost", "options": {option: {"kl", "passkey_drop", "fit"}}}
    swapped: list[int]
    kept: dict[str, str]  # kept layer -> why
    measured_kl: float | None
    recipe: list[dict]
    config: dict
    cpu_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class Suffix:
    """The original's inputs to every decoder layer on fixed token ids, so a model changed only from layer
    ``start`` on is evaluated by running layers ``start..`` alone (half the cost of a full forward, on average)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor):
        arch = arch_of(model)
        self.ids, self.arch = ids, arch
        io = capture_io(model, {str(i): layer for i, layer in enumerate(arch.layers)}, ids, batch_size=ids.shape[0])
        self.calls = [io[str(i)].calls[0] for i in range(len(arch.layers))]

    @torch.no_grad()
    def logits(self, start: int, keep: int) -> torch.Tensor:
        """(batch, keep, vocab) logits of the last ``keep`` positions, layers ``start..`` run on the stored input."""
        args, kwargs = self.calls[start]
        hidden = args[0]  # (batch, seq, hidden)
        for index in range(start, len(self.arch.layers)):
            args, kwargs = self.calls[index]
            out = self.arch.layers[index](hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
        return self.arch.logits(self.arch.final_norm(hidden[:, -keep:]))


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits[:, :-1].float(), -1)  # (windows, scored - 1, vocab): predicts inside the window


@torch.no_grad()
def _scored_logprobs(model: nn.Module, windows: torch.Tensor, score_from: int) -> torch.Tensor:
    return _logprobs(model(windows, use_cache=False, logits_to_keep=windows.shape[1] - score_from).logits)


def _kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> float:
    return float((teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean())


@torch.no_grad()
def answer_loglik(model: nn.Module, passkey: Passkey, suffix: Suffix | None = None, start: int = 0) -> float:
    """Teacher-forced log-likelihood of the answer after the prompt (with ``suffix``: layers ``start..`` only)."""
    keep = len(passkey.answer) + 1
    if suffix is None:
        logits = model(torch.tensor([passkey.ids + passkey.answer]), use_cache=False, logits_to_keep=keep).logits
    else:
        logits = suffix.logits(start, keep)
    logits = logits[0, :-1].float()
    return float(F.log_softmax(logits, -1).gather(-1, torch.tensor(passkey.answer)[:, None]).sum())


class _Swapped:
    """Swap one layer for the duration of a ``with`` block, then put the original module back."""

    def __init__(self, model, index: int, option: str):
        self.model, self.index, self.option = model, index, option

    def __enter__(self):
        arch = arch_of(self.model)
        self.original = arch.attention(self.index).module
        self.record = dict(getattr(self.model.config, SWAP_KEY, None) or {})
        kind, settings = parse_policy(self.option)
        return swap_layer(self.model, self.index, kind, settings)

    def __exit__(self, *exc):
        arch = arch_of(self.model)
        setattr(arch.layers[self.index], arch.family.attention, self.original)
        setattr(self.model.config, SWAP_KEY, self.record or None)
        return False


def fit_replacement(module, io, config: SearchConfig) -> dict | None:
    """Layer-local fit of a replacement's new parameters on the original's captured calls (None: nothing to fit)."""
    names = module.new_parameters()
    if not names or config.fit_steps == 0 or io is None:
        return None
    params = dict(module.named_parameters())
    frozen = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():  # no gradients for the original's projections: only the new parameters move
        p.requires_grad_(n in names)
    try:
        result = fit_module(module, io, LocalFitConfig(steps=config.fit_steps, lr=config.fit_lr, batch_calls=1,
                                                       heldout_fraction=0.0, seed=config.seed), [params[n] for n in names])
    finally:
        for n, p in params.items():
            p.requires_grad_(frozen[n])
    return {"before": result.before, "after": result.after}


def layer_sensitivity(model: nn.Module, windows: torch.Tensor, config: SearchConfig,
                      passkey: Passkey | list[Passkey] | None = None) -> list[dict]:
    """One row per layer: each option's KL, passkey nats lost (mean over the prompts) and fit; the cheapest
    option and its cost."""
    with widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones (the replacements' own stay bf16)
        return _layer_sensitivity(model, windows, config, passkey)


def _passkey_list(passkey: Passkey | list[Passkey] | None) -> list[Passkey]:
    return [] if passkey is None else [passkey] if isinstance(passkey, Passkey) else list(passkey)


def _mean_drop(base: list[float], answers) -> float:
    """Mean nats of answer log-likelihood lost over the prompts (0 without prompts)."""
    drops = [b - a for b, a in zip(base, answers)]
    return sum(drops) / len(drops) if drops else 0.0


def _layer_sensitivity(model: nn.Module, windows: torch.Tensor, config: SearchConfig,
                       passkey: Passkey | list[Passkey] | None) -> list[dict]:
    layers = len(arch_of(model).layers)
    teacher = _scored_logprobs(model, windows, config.score_from)
    keep = windows.shape[1] - config.score_from
    text = Suffix(model, windows)
    prompts = [(p, Suffix(model, torch.tensor([p.ids + p.answer]))) for p in _passkey_list(passkey)]
    base_answers = [answer_loglik(model, p, suffix) for p, suffix in prompts]

    def passkey_drop(index: int) -> float:
        return _mean_drop(base_answers, (answer_loglik(model, p, suffix, index) for p, suffix in prompts))
    needs_fit = any(REPLACEMENTS[parse_policy(o)[0]].trains for o in config.options)
    io = capture_attention_io(model, windows, list(range(layers)), batch_size=1) if needs_fit and config.fit_steps else {}
    table = []
    for index in range(layers):
        results = {}
        for option in config.options:
            with _Swapped(model, index, option) as module:
                fit = fit_replacement(module, io.get(index), config)
                kl = _kl(teacher, _logprobs(text.logits(index, keep)))
                drop = passkey_drop(index)
            results[option] = {"kl": kl, "passkey_drop": drop, "fit": fit,
                               "cost": kl + config.passkey_weight * max(drop, 0.0)}
        best = pick_option(results, config)
        table.append({"layer": index, "option": best, "cost": results[best]["cost"], "options": results})
        log.info("layer %d: %s cost %.4f", index, best, results[best]["cost"])
    return table


def pick_option(results: dict, config: SearchConfig) -> str:
    """The first option (options go from the smallest cache to the largest) within ``slack`` of the cheapest."""
    best = min(results[o]["cost"] for o in config.options)
    return next(o for o in config.options if results[o]["cost"] <= best + config.slack)


def greedy_select(table: list[dict], config: SearchConfig, measure=None, passkey_drop=None) -> tuple[list[int], float | None]:
    """Layers to swap (cheapest first) and, in epsilon mode, their measured KL together (``measure(layers)``);
    in count mode with ``passkey_drop(layers)`` (the set's joint passkey loss), only layers that keep it within
    ``config.passkey_budget``."""
    order = sorted(table, key=lambda row: (row["cost"], row["layer"]))
    room = len(table) - config.keep
    if config.count is not None:
        if config.count > room:
            raise LeanLMError(f"cannot swap {config.count} of {len(table)} layers and keep {config.keep} with full attention")
        if passkey_drop is None:
            return sorted(row["layer"] for row in order[: config.count]), None
        chosen: list[int] = []
        for row in order:  # (count <= room: at least keep layers stay, whichever are skipped)
            if len(chosen) == config.count:
                break
            drop = passkey_drop(chosen + [row["layer"]])
            log.info("with layer %d: the set loses %.2f nats of passkey answer (budget %.2f)", row["layer"], drop,
                     config.passkey_budget)
            if drop <= config.passkey_budget:
                chosen.append(row["layer"])
        return sorted(chosen), None
    chosen, total = [], 0.0
    for row in order[:room]:
        if total + row["cost"] > config.epsilon:
            break
        chosen.append(row["layer"])
        total += row["cost"]
    measured = measure(chosen) if measure and chosen else None
    while measure and chosen and measured > config.epsilon:
        chosen.pop()
        measured = measure(chosen) if chosen else None
    return sorted(chosen), measured


def recipe_items(table: list[dict], swapped: list[int], keep: int) -> list[dict]:
    """``swap_attention`` recipe items: one per distinct option, its layers in order."""
    by_option: dict[str, list[int]] = {}
    for index in swapped:
        by_option.setdefault(table[index]["option"], []).append(index)
    items = []
    for option, layers in by_option.items():
        kind, settings = parse_policy(option)
        items.append({"name": "swap_attention", "replacement": kind, "layers": layers, "keep": keep, **settings})
    return items


def apply_choice(model: nn.Module, table: list[dict], layers: list[int]) -> None:
    """Swap ``layers`` in place with the option the table chose for each."""
    for index in layers:
        kind, settings = parse_policy(table[index]["option"])
        swap_layer(model, index, kind, settings)


def search(model: nn.Module, windows: torch.Tensor, config: SearchConfig | None = None,
           passkey: Passkey | list[Passkey] | None = None, table: list[dict] | None = None) -> SearchResult:
    """Sensitivity (unless ``table`` is given) + greedy selection; ``model`` is left unchanged."""
    config = config or SearchConfig()
    began = time.process_time()
    torch.manual_seed(config.seed)
    if table is None:
        table = layer_sensitivity(model, windows, config, passkey)
    else:  # measured before: re-pick each layer's option under this config (options and slack may differ)
        table = [{**row, "option": (option := pick_option(row["options"], config)), "cost": row["options"][option]["cost"]}
                 for row in table]
    with widened_linears(model):
        teacher = _scored_logprobs(model, windows, config.score_from) if config.count is None else None

    def measure(layers: list[int]) -> float:
        trial = copy.deepcopy(model)
        apply_choice(trial, table, layers)
        with widened_linears(trial):
            return _kl(teacher, _scored_logprobs(trial, windows, config.score_from))

    prompts = _passkey_list(passkey) if config.passkey_budget is not None else []
    with widened_linears(model):  # as the trials below
        base = [answer_loglik(model, p) for p in prompts]

    def joint_passkey_drop(layers: list[int]) -> float:  # the layers swapped together
        trial = copy.deepcopy(model)
        apply_choice(trial, table, layers)
        with widened_linears(trial):
            return _mean_drop(base, (answer_loglik(trial, p) for p in prompts))

    swapped, measured = greedy_select(table, config, measure, joint_passkey_drop if base else None)
    ranks = {row["layer"]: r for r, row in enumerate(sorted(table, key=lambda row: (row["cost"], row["layer"])), 1)}
    kept = {str(row["layer"]): (f"cost {row['cost']:.4f} as {row['option']} (KL {row['options'][row['option']]['kl']:.4f}, "
                                f"passkey -{max(row['options'][row['option']]['passkey_drop'], 0):.2f} nats): "
                                f"rank {ranks[row['layer']]} of {len(table)} by sensitivity")
            for row in table if row["layer"] not in swapped}
    return SearchResult(table, swapped, kept, measured, recipe_items(table, swapped, config.keep), asdict(config),
                        time.process_time() - began)


__all__ = ["Passkey", "SearchConfig", "SearchResult", "answer_loglik", "apply_choice", "greedy_select",
           "layer_sensitivity", "recipe_items", "search"]
