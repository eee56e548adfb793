"""``leanlm plan --kv-budget 0.125``: pick, from cheap KL probes, the per-layer KV heads and the run-time
cache policy that meet one byte budget, and write them as a recipe.

Probes (on WikiText-2 *validation* windows, never test):
- per layer and per smaller KV-head count: merge that one layer (``share_kv``, calibrated by default),
  measure the KL of the next-token distribution to the original on the probe windows, put the layer back;
- per run-time policy and budget (``quantized``, ``heavy_hitter+int4``...): the continuation protocol's KL
  to the full cache on the original model, and the bytes the policy's cache really held (as a fraction
  of the full cache).
Selection assumes the KL of independent changes adds up (a first-order estimate, stated in the plan):
for every policy option (and none), layers are merged cheapest-KL-per-byte first until
``structure fraction x policy fraction <= budget``; the option with the least estimated KL wins.
The plan is a recipe (``transforms: [share_kv per_layer]``) plus the run-time policy to evaluate or
serve it with (recipes carry no cache policy: it is written in the header and in plan.json).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, arch_of
from leanlm.models.widen import widened_linears
from leanlm.transforms.share_kv.calibration import attention_input_moments
from leanlm.transforms.share_kv.merge import calibrated_merge, mean_merge

NO_POLICY = "none"


@dataclass
class PolicyProbe:
    """One run-time policy setting: the bytes its cache held (÷ the full cache) and its KL to the full cache."""

    policy: str
    budget: float
    bytes_fraction: float
    kl: float


@dataclass
class KVPlan:
    budget: float
    kv_heads_per_layer: list[int]
    policy: str  # NO_POLICY or a policy spec for make_policy
    policy_budget: float  # of the structure's own full cache
    structure_fraction: float
    bytes_fraction: float  # structure_fraction x the policy's measured fraction
    estimated_kl: float  # sum of the probed per-layer KLs + the policy's KL (additivity assumed)
    method: str
    options: list[dict] = field(default_factory=list)  # every policy option considered, best first

    def to_dict(self) -> dict:
        return asdict(self)


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(p_reference || p) over positions, nats; both (tokens, vocab)."""
    ref = reference.float().log_softmax(-1)
    return float(F.kl_div(logits.float().log_softmax(-1), ref, log_target=True, reduction="batchmean"))


@torch.no_grad()
def _logits(model: nn.Module, batches: Sequence[torch.Tensor]) -> torch.Tensor:
    with widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones
        return torch.cat([model(b, use_cache=False).logits.flatten(0, 1) for b in batches])  # (tokens, vocab)


@torch.no_grad()
def layer_probes(model: nn.Module, batches: Sequence[torch.Tensor], method: str = "calibrated",
                 damping: float = 0.01) -> list[dict[int, float]]:
    """``[{kv_heads: KL}, ...]`` per layer: the KL of merging only that layer to each divisor of its KV heads
    (its own count is 0 by definition). The model is left as it was."""
    arch, spec = arch_of(model), ModelSpec.from_model(model)
    reference = _logits(model, batches)
    moments = attention_input_moments(model, batches, range(spec.num_layers)) if method == "calibrated" else {}
    probes = []
    for layer, have in enumerate(spec.kv_heads_per_layer):
        row = {have: 0.0}
        for count in (k for k in range(1, have) if have % k == 0):
            saved = copy.deepcopy(arch.attention(layer).module)
            view = arch.attention(layer)
            if method == "calibrated":
                calibrated_merge(view, count, moments[layer], damping)
            else:
                mean_merge(view, count)
            row[count] = _kl(reference, _logits(model, batches))
            setattr(arch.layers[layer], arch.family.attention, saved)
        probes.append(row)
    return probes


def policy_probes(model: nn.Module, tokenizer, policies: Sequence[str], budgets: Sequence[float],
                  context: int = 512, continuation: int = 64, windows: int = 2) -> list[PolicyProbe]:
    """KL and measured bytes of each policy at each budget, continuation protocol on WikiText-2 validation."""
    from leanlm.evaluate.kv import ContinuationProtocol, continuation_perplexity, continuation_reference
    from leanlm.kvcache import make_policy

    protocol = ContinuationProtocol(split="validation", context=context, continuation=continuation, windows=windows)
    reference = continuation_reference(model, tokenizer, protocol)
    full = reference.result.bytes_per_token
    probes = []
    for name in policies:
        for budget in budgets:
            factory = lambda n, name=name, budget=budget: make_policy(name, budget, n, tokenizer, model)  # noqa: E731
            result = continuation_perplexity(model, tokenizer, factory, protocol, reference=reference)
            probes.append(PolicyProbe(name, budget, result.bytes_per_token / full, result.kl))
    return probes


def _merge_to_fit(probes: list[dict[int, float]], allowed_heads: float) -> tuple[list[int], float] | None:
    """Per-layer KV heads with at most ``allowed_heads`` in all, cheapest KL per head saved first; None if impossible."""
    choice = [max(row) for row in probes]
    total = sum(choice)
    while total > allowed_heads + 1e-9:
        moves = []
        for layer, row in enumerate(probes):
            smaller = [k for k in row if k < choice[layer]]
            for k in smaller:
                moves.append(((row[k] - row[choice[layer]]) / (choice[layer] - k), layer, k))
        if not moves:
            return None
        _, layer, k = min(moves)
        total -= choice[layer] - k
        choice[layer] = k
    return choice, sum(probes[layer][k] for layer, k in enumerate(choice))


def choose_plan(probes: list[dict[int, float]], policies: Sequence[PolicyProbe], budget: float,
                method: str = "calibrated") -> KVPlan:
    """The least estimated KL over {no policy} ∪ ``policies`` that meets ``budget`` (see the module doc)."""
    if not 0 < budget <= 1:
        raise LeanLMError(f"the KV budget is a fraction of the full cache in (0, 1], got {budget}")
    full_heads = sum(max(row) for row in probes)
    options = []
    for probe in [PolicyProbe(NO_POLICY, 1.0, 1.0, 0.0), *policies]:
        fitted = _merge_to_fit(probes, budget / probe.bytes_fraction * full_heads)
        if fitted is None:
            continue
        heads, structure_kl = fitted
        structure = sum(heads) / full_heads
        options.append(KVPlan(budget, heads, probe.policy, probe.budget, structure, structure * probe.bytes_fraction,
                              structure_kl + probe.kl, method))
    if not options:
        raise LeanLMError(f"no plan meets a KV budget of {budget}: even MQA in every layer with the smallest "
                          "policy budget probed holds more; probe smaller policy budgets")
    options.sort(key=lambda p: p.estimated_kl)
    best = options[0]
    best.options = [{k: v for k, v in o.to_dict().items() if k != "options"} for o in options]
    return best


def plan_recipe(plan: KVPlan, model: str) -> str:
    """The plan as a recipe (YAML text): share_kv per layer, the run-time policy in the header."""
    policy = ("the full cache" if plan.policy == NO_POLICY else
              f"--kv-cache {plan.policy} --kv-budget {plan.policy_budget}")
    return (f"# Written by `leanlm plan --kv-budget {plan.budget}`: per-layer KV heads from KL probes, then run with\n"
            f"# {policy} (of the merged model's own cache). Estimated bytes {plan.bytes_fraction:.4f} of the original\n"
            f"# bf16 cache; estimated KL {plan.estimated_kl:.4f} nats (probed per change, assumed additive).\n"
            f"name: kv-plan-{plan.budget}\nmodel: {model}\n"
            f"calibration: {{samples: 16, seq_len: 256}}\n"
            f"transforms:\n  - {{name: share_kv, method: {plan.method}, per_layer: {plan.kv_heads_per_layer}}}\n")
