"""Recovery of a swapped model (PostNAS): layer-local attention transfer, then KD of the new layers only.

1. Attention transfer (LoLCATs): each replacement with new parameters is fitted, alone, to reproduce
   the original attention's outputs on the original's own inputs (``layer_local.fit_module`` on
   ``capture_attention_io`` of the teacher), all other weights frozen.
2. End-to-end KD (``distill``) with only the replacements' new parameters trainable (``train_only``),
   to a CPU budget (``max_cpu_minutes``: process CPU time, honest on a shared machine).
Sliding-window replacements add no parameters: nothing to recover there.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from leanlm.recover.config import DistillConfig
from leanlm.recover.distill import distill, train_only
from leanlm.recover.layer_local import LocalFitConfig, capture_attention_io, fit_module
from leanlm.transforms.swap_attention import swapped_layers


@dataclass
class SwapRecoverConfig:
    fit_steps: int = field(default=60, metadata={"help": "layer-local Adam steps per new layer"})
    fit_lr: float = field(default=3e-3, metadata={"help": "layer-local learning rate"})
    kd: DistillConfig | None = field(default=None, metadata={"help": "end-to-end KD of the new parameters; None = skip"})


def new_parameter_patterns(model: nn.Module) -> list[str]:
    """Regexes naming exactly the swapped layers' new parameters (for ``train_only``)."""
    names = []
    for module in swapped_layers(model).values():
        prefix = next(n for n, m in model.named_modules() if m is module)
        names += [f"^{re.escape(prefix)}.{re.escape(p)}$" for p in module.new_parameters()]
    return names


def recover_swapped(student: nn.Module, teacher: nn.Module, fit_windows: torch.Tensor, kd_windows: torch.Tensor | None,
                    config: SwapRecoverConfig, out_dir: str | None = None) -> dict:
    """Fit, then distil, the new layers of ``student`` (in place). Returns what each stage did and its CPU time."""
    began = time.process_time()
    flags = {name: p.requires_grad for name, p in student.named_parameters()}  # restored at the end
    trainable = {i: m for i, m in swapped_layers(student).items() if m.new_parameters()}
    report: dict = {"layers": sorted(trainable), "fits": {}}
    if not trainable:
        report["note"] = "no replacement has new parameters: nothing to recover"
        return report
    io = capture_attention_io(teacher, fit_windows, sorted(trainable), batch_size=1)
    for index, module in trainable.items():
        params = dict(module.named_parameters())
        for name, p in params.items():  # the original's projections stay as they are: no gradients for them
            p.requires_grad_(name in module.new_parameters())
        result = fit_module(module, io[index], LocalFitConfig(steps=config.fit_steps, lr=config.fit_lr, batch_calls=1,
                                                              heldout_fraction=0.25 if len(io[index].calls) > 1 else 0.0),
                            [params[n] for n in module.new_parameters()])
        report["fits"][str(index)] = asdict(result)
    del io
    report["fit_cpu_seconds"] = time.process_time() - began
    if config.kd is not None and kd_windows is not None:
        train_only(student, new_parameter_patterns(student))
        student.train()
        result = distill(student, teacher, kd_windows, config.kd, out_dir=out_dir)
        student.eval()
        report["kd"] = {"steps": len(result.losses), "first_loss": result.losses[0] if result.losses else None,
                        "last_loss": result.losses[-1] if result.losses else None, "stopped_early": result.stopped_early}
    for name, p in student.named_parameters():
        p.requires_grad_(flags[name])
    report["cpu_seconds"] = time.process_time() - began
    return report


__all__ = ["SwapRecoverConfig", "new_parameter_patterns", "recover_swapped"]
