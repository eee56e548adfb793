"""The layer-local recovery stage: before logit KD, fit each changed attention layer to the teacher's.

For every layer whose attention the transforms changed (fewer query heads or KV groups than the
teacher's), ``leanlm.recover.layer_local`` records what the teacher's attention received and returned
on calibration windows; the student's layer is then fitted to reproduce those outputs from the very
same inputs (no backward through the model):

- ``lstsq`` (default): the o_proj of the kept heads, in closed form: ridge least squares on the *change*
  of the weight (targets y - x W0), so the ridge pulls toward the pruned layer's own o_proj instead of
  toward zero. The kept heads' outputs are remixed to stand in for the removed ones. (On SmolLM2 the
  plain fit, ridge 1e-4 toward zero, made 7 of 16 pruned layers worse on held-out windows; the change
  with ridge 1 improved each of the 5 layers checked, e.g. layer 7 0.632 -> 0.429, layer 4 0.261 -> 0.204);
- ``adam``: every parameter of the layer's attention, a few Adam steps (``LocalFitConfig``).

Each layer's relative error ||y - ŷ||² / ||y||² is reported before and after, on the calls fitted and
on calls held out of the fit.

    report = local_stage(student, teacher, windows, LocalStageConfig(windows=16))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models import ModelSpec, arch_of
from leanlm.models.widen import widened_linears
from leanlm.recover.layer_local import (
    LocalFitConfig,
    ModuleIO,
    capture_attention_io,
    fit_linear_lstsq,
    fit_module,
    linear_inputs,
    relative_error,
)

METHODS = ("none", "lstsq", "adam")  # none: no layer-local stage (a recipe's default)


@dataclass
class LocalStageConfig:
    """Settings of the layer-local stage."""

    method: str = field(default="lstsq", metadata={"help": "lstsq (o_proj, closed form) | adam (whole attention) | "
                                                           "none (skip the stage)"})
    windows: int = field(default=16, metadata={"help": "calibration windows captured from the teacher"})
    batch_size: int = field(default=2, metadata={"help": "windows per captured call"})
    heldout_fraction: float = field(default=0.25, metadata={"help": "share of the calls kept out of the fit"})
    ridge: float = field(default=1.0, metadata={"help": "lstsq: ridge on the weight change, relative to the mean "
                                                          "diagonal of XᵀX"})
    adam: LocalFitConfig = field(default_factory=LocalFitConfig, metadata={"help": "adam: per-layer fit settings"})
    seed: int = field(default=0, metadata={"help": "seeds the held-out split"})

    def check(self) -> None:
        if self.method not in METHODS:
            raise LeanLMError(f"layer-local method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.windows < 2 or self.batch_size < 1 or self.ridge < 0 or not 0 < self.heldout_fraction < 1:
            raise LeanLMError("layer-local stage needs windows >= 2, batch_size >= 1, ridge >= 0, heldout_fraction in (0, 1)")
        if self.windows // self.batch_size < 2:
            raise LeanLMError(f"{self.windows} windows in calls of {self.batch_size} leave no call to hold out")


def changed_attention_layers(student: nn.Module, teacher: nn.Module) -> list[int]:
    """Layers whose attention has other query or KV head counts in the student than in the teacher."""
    s, t = ModelSpec.from_model(student), ModelSpec.from_model(teacher)
    if s.num_layers != t.num_layers:
        raise LeanLMError(f"the student has {s.num_layers} layers and the teacher {t.num_layers}: "
                          "the layer-local stage pairs layers one to one")
    return [i for i in range(s.num_layers)
            if (s.heads_per_layer[i], s.kv_heads_per_layer[i]) != (t.heads_per_layer[i], t.kv_heads_per_layer[i])]


def _split(count: int, config: LocalStageConfig) -> tuple[list[int], list[int]]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed)).tolist()
    held = max(1, int(round(count * config.heldout_fraction)))
    return sorted(order[held:]), sorted(order[:held])


def _subset(io: ModuleIO, ids: list[int]) -> ModuleIO:
    return ModuleIO([io.calls[i] for i in ids], [io.outputs[i] for i in ids])


@torch.no_grad()
def fit_change_lstsq(o_proj: nn.Linear, module: nn.Module, io: ModuleIO, ridge: float) -> None:
    """o_proj.weight += the ridge least-squares ΔW with x (W0 + ΔW)ᵀ ≈ y on the captured calls."""
    inputs = linear_inputs(module, o_proj, io)  # what o_proj receives: (batch, seq, kept heads x head_dim) each
    current = o_proj.weight.detach().float()  # (out, in)
    residuals = [y.float() - x.float() @ current.T for x, y in zip(inputs, io.outputs)]  # (batch, seq, out)
    change = nn.Linear(o_proj.in_features, o_proj.out_features, bias=False, device=current.device)  # float32
    fit_linear_lstsq(change, inputs, residuals, ridge)
    o_proj.weight.copy_((current + change.weight).to(o_proj.weight.dtype))


def fit_layer(module: nn.Module, io: ModuleIO, config: LocalStageConfig) -> dict:
    """Fit one attention module to the captured teacher calls; its errors before/after, fitted and held out."""
    fit_ids, held_ids = _split(len(io.calls), config)
    record = {"before": relative_error(module, io, fit_ids), "heldout_before": relative_error(module, io, held_ids)}
    if config.method == "lstsq":
        fit_change_lstsq(module.o_proj, module, _subset(io, fit_ids), config.ridge)
    else:
        adam = LocalFitConfig(**{**asdict(config.adam), "heldout_fraction": 0.0})
        fit_module(module, _subset(io, fit_ids), adam)
    record |= {"after": relative_error(module, io, fit_ids), "heldout_after": relative_error(module, io, held_ids)}
    return record


def local_stage(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: LocalStageConfig | None = None,
                layers: list[int] | None = None) -> dict:
    """Fit the student's changed attention layers (or ``layers``) to the teacher's, in place; a JSON-ready report.

    ``windows`` (num_windows, seq_len): calibration text (training data, never the test split); the first
    ``config.windows`` are used. ``cpu_seconds`` counts capture and fits (process CPU time).
    """
    config = config or LocalStageConfig()
    config.check()
    began = time.process_time()
    layers = changed_attention_layers(student, teacher) if layers is None else list(layers)
    if config.method == "none" or not layers:
        return {"config": asdict(config), "layers": {}, "cpu_seconds": time.process_time() - began}
    if windows.shape[0] < config.windows:
        raise LeanLMError(f"the layer-local stage wants {config.windows} windows, the data has {windows.shape[0]}")
    # One teacher pass for all layers (SmolLM2, 16 x 256 tokens: ~10 MB of bf16 activations per layer).
    with widened_linears(student, teacher):  # float32 GEMMs where the CPU has no bf16 ones
        captured = capture_attention_io(teacher, windows[: config.windows], layers, config.batch_size)
        records = {}
        for layer in layers:
            records[layer] = fit_layer(arch_of(student).attention(layer).module, captured.pop(layer), config)
    return {"config": asdict(config), "layers": records, "cpu_seconds": time.process_time() - began}
