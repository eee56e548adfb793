"""Layer-local fitting: make a changed module reproduce the original's outputs, one layer at a time.

After a structural change (pruned heads, shared KV heads, a latent KV, a linear-attention swap) each
changed layer's output drifts from the teacher's. Fitting each one on its own first, with the very
inputs the original layer saw and its outputs as targets, is cheap (no backward through the whole
model, one layer's activations in memory) and starts the end-to-end distillation close:

    io = capture_attention_io(teacher, windows, layers=[3, 7])          # the original's calls and outputs
    result = fit_module(arch_of(student).attention(3).module, io[3])    # Adam on the student's layer
    fit_linear_lstsq(o_proj, linear_inputs(student_attention, o_proj, io[3]), io[3].outputs)  # closed form

Inputs and targets both come from the teacher (attention transfer, as LoLCATs does): a layer learns
the original function, not a patch for the errors of the layers before it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from leanlm.errors import LeanLMError
from leanlm.models.arch import arch_of
from leanlm.models.widen import widened_linears


@dataclass
class LocalFitConfig:
    """Settings of one layer's Adam fit."""

    steps: int = field(default=100, metadata={"help": "Adam steps per layer"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    batch_calls: int = field(default=4, metadata={"help": "captured forward calls (micro-batches of windows) per step"})
    heldout_fraction: float = field(default=0.25, metadata={"help": "share of the calls kept out of the fit to report on"})
    seed: int = field(default=0, metadata={"help": "seeds the order of the calls"})

    def check(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch_calls < 1:
            raise LeanLMError(f"layer-local fit needs steps ≥ 1, lr > 0 and batch_calls ≥ 1, got {self}")
        if not 0 <= self.heldout_fraction < 1:
            raise LeanLMError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class ModuleIO:
    """What one module was called with and what it returned, per forward call (one call per micro-batch)."""

    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # (args, kwargs), tensors detached
    outputs: list[torch.Tensor] = field(default_factory=list)  # (batch, seq, hidden): the first output


@dataclass
class LocalFitResult:
    """Relative squared error ||y - ŷ||² / ||y||² before and after, on fitted and held-out calls."""

    before: float
    after: float
    heldout_before: float
    heldout_after: float
    steps: int
    cpu_seconds: float


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def _cast(value, dtype: torch.dtype):
    """Floating tensors (also inside tuples, e.g. RoPE's (cos, sin)) to ``dtype``; the rest as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_io(model: nn.Module, modules: dict[str, nn.Module], windows: torch.Tensor, batch_size: int = 4) -> dict[str, ModuleIO]:
    """Run ``model`` over ``windows`` (num_windows, seq_len) and record each named module's calls and outputs."""
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise LeanLMError("windows must be a non-empty (num_windows, seq_len) tensor of token ids")
    records = {name: ModuleIO() for name in modules}
    hooks = []
    for name, module in modules.items():
        def hook(_module, args, kwargs, output, record=records[name]):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            record.calls.append((_detach(args), _detach(kwargs)))
            record.outputs.append(_first(output).detach())

        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with widened_linears(model):  # float32 GEMMs where the CPU has no bf16 ones
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return records


def capture_attention_io(model: nn.Module, windows: torch.Tensor, layers: Sequence[int], batch_size: int = 4) -> dict[int, ModuleIO]:
    """The attention modules' calls and outputs at ``layers``, keyed by layer index."""
    arch = arch_of(model)
    bad = [i for i in layers if not 0 <= i < len(arch.layers)]
    if bad:
        raise LeanLMError(f"layers {bad} do not exist: the model has {len(arch.layers)} layers")
    named = {str(i): arch.attention(i).module for i in layers}
    return {int(name): io for name, io in capture_io(model, named, windows, batch_size).items()}


@torch.no_grad()
def attention_input_pass(model: nn.Module, batches, callbacks: dict[int, Callable[[torch.Tensor, dict], None]]) -> None:
    """Run ``model`` over ``batches`` (each (batch, seq) ids) calling ``callbacks[layer](hidden, kwargs)`` with what
    each listed layer's attention receives (hidden (batch, seq, hidden); kwargs: RoPE tables, mask), hooks removed after."""
    arch = arch_of(model)
    handles = []
    for index, callback in callbacks.items():
        def hook(_module, args, kwargs, callback=callback):
            callback(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], kwargs)
        handles.append(arch.attention(index).module.register_forward_pre_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with widened_linears(model):
            for batch in batches:
                model(batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()


def _replay(module: nn.Module, call: tuple[tuple, dict], dtype: torch.dtype) -> torch.Tensor:
    args, kwargs = call
    return _first(module(*_cast(args, dtype), **_cast(kwargs, dtype)))


def relative_error(module: nn.Module, io: ModuleIO, indices: Sequence[int]) -> float:
    """Σ ||y - module(x)||² / Σ ||y||² over the calls at ``indices`` (in the module's dtype)."""
    if not indices:
        return float("nan")
    dtype = next(module.parameters()).dtype
    err = norm = 0.0
    with torch.no_grad():
        for i in indices:
            target = io.outputs[i].to(dtype)
            err += float((_replay(module, io.calls[i], dtype) - target).float().pow(2).sum())
            norm += float(target.float().pow(2).sum())
    return err / max(norm, 1e-30)


def _split(count: int, config: LocalFitConfig) -> tuple[list[int], list[int]]:
    order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed)).tolist()
    held = int(round(count * config.heldout_fraction))
    if count - held < 1:
        raise LeanLMError(f"{count} captured calls leave none to fit after holding out {held}")
    return order[held:], order[:held]


def fit_module(module: nn.Module, io: ModuleIO, config: LocalFitConfig | None = None,
               params: Sequence[nn.Parameter] | None = None) -> LocalFitResult:
    """Adam on ``params`` (default: every parameter of ``module``) to minimise the squared error to the captured outputs.

    The fit runs in float32 (a bf16 module is cast up for the fit and back after), one layer only.
    """
    config = config or LocalFitConfig()
    config.check()
    fit_ids, held_ids = _split(len(io.calls), config)
    original_dtype = next(module.parameters()).dtype
    module.float()
    params = list(params) if params is not None else [p for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    began = time.process_time()
    before, held_before = relative_error(module, io, fit_ids), relative_error(module, io, held_ids)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 1)
    for _ in range(config.steps):
        pick = torch.randint(len(fit_ids), (min(config.batch_calls, len(fit_ids)),), generator=generator).tolist()
        optimizer.zero_grad(set_to_none=True)
        loss = sum(
            (_replay(module, io.calls[fit_ids[j]], torch.float32) - io.outputs[fit_ids[j]].float()).pow(2).mean()
            for j in pick
        ) / len(pick)
        loss.backward()
        optimizer.step()
    after, held_after = relative_error(module, io, fit_ids), relative_error(module, io, held_ids)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
    module.to(original_dtype)
    return LocalFitResult(before, after, held_before, held_after, config.steps, time.process_time() - began)


@torch.no_grad()
def linear_inputs(module: nn.Module, linear: nn.Linear, io: ModuleIO) -> list[torch.Tensor]:
    """What ``linear`` (inside ``module``) receives when ``module`` is replayed on the captured calls."""
    seen: list[torch.Tensor] = []
    handle = linear.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    dtype = next(module.parameters()).dtype
    try:
        for call in io.calls:
            _replay(module, call, dtype)
    finally:
        handle.remove()
    return seen


@torch.no_grad()
def fit_linear_lstsq(linear: nn.Linear, inputs: list[torch.Tensor], targets: list[torch.Tensor], ridge: float = 1e-4) -> float:
    """Set ``linear``'s weight (and bias) to the ridge least-squares map inputs → targets; returns the relative error after.

    Solves (XᵀX + λ·mean(diag)·I) W = XᵀY in float64 over all captured tokens, one layer at a time.
    """
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).double()  # (tokens, in)
    y = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets]).double()  # (tokens, out)
    if linear.bias is not None:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram, x.T @ y)  # (in [+1], out)
    weight = solution[: linear.in_features].T
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(solution[-1].to(linear.bias.dtype))
    fitted = x @ solution
    return float((fitted - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30))
