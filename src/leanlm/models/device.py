"""Which device a model runs on, and timings that wait for it.

``auto`` means CUDA when ``torch.cuda.is_available()``, else the CPU. Asking for ``cuda`` on a
machine without it is a user mistake (``LeanLMError``), not a silent fall back to the CPU.
CUDA kernels run asynchronously: a timer must wait for them (``synchronize``) before it reads the
clock, or it measures the launch, not the work; ``synced_clock`` is the one clock every timing uses.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from leanlm.errors import LeanLMError

DEVICES = ("auto", "cpu", "cuda")  # the --device choices and the recipe's `device:` values


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` (or ``cuda:N``, or a torch.device) -> the torch.device to use."""
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else name
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise LeanLMError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise LeanLMError(f"device '{name}' was asked for, but this machine has no CUDA device that torch can use "
                          "(use --device cpu or auto)")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the queued kernels of ``device`` to finish (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def synced_clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` after the device's queued work is done: use it on both ends of a timing."""
    synchronize(device)
    return time.perf_counter()
