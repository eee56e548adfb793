"""Knowledge distillation: recover a compressed student by matching the original model (the teacher).

Loss per next-token position (float32, like torchtune's KD recipe):
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, label)
The T^2 factor keeps the KD gradients on the same scale for any temperature (Hinton et al., 2015).

The loop is written against `accelerate` (prepare / backward / autocast / is_main_process), so it
runs unchanged under `accelerate launch` or `torchrun`. It is resumable: checkpoints hold the
trainable parameters, optimizer, scheduler, RNG and loss history, and the batch of every step is
fixed by (seed, step), so a killed and resumed run ends bit-for-bit where an uninterrupted one does
(on CPU; tested).

This module is the loop; its pieces live beside it: ``config`` (DistillConfig, DistillResult),
``setup`` (bf16 choice, the accelerator, ``train_only``),
``losses`` (kd_loss, kd_loss_topk), ``teacher_cache`` (the teacher's top-k logits), ``windows``
(training windows and their order); the loss plot is ``leanlm.report.loss_plot``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from leanlm.errors import Interrupted, LeanLMError
from leanlm.models.widen import widened_linears
from leanlm.recover.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint, stop_requested
from leanlm.recover.config import TRAJECTORY_FIELDS, DistillConfig, DistillResult
from leanlm.recover.setup import auto_bf16, bf16_supported, make_accelerator, train_only  # noqa: F401 (re-exported)
from leanlm.recover.losses import kd_loss, kd_loss_topk
from leanlm.recover.teacher_cache import TeacherTopK, build_teacher_topk
from leanlm.recover.windows import stream_windows, windows_fingerprint

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------- the loop


@dataclass
class _Run:
    """Everything one distill() call holds, so the loop's helpers stay small."""

    config: DistillConfig
    out_dir: Path
    accelerator: Accelerator
    student: nn.Module  # as prepared by accelerate
    teacher: nn.Module | None
    windows: torch.Tensor  # (num_windows, seq_len)
    optimizer: torch.optim.Optimizer
    scheduler: object
    eval_fn: Callable[[nn.Module], float] | None
    fingerprint: str
    bf16: bool
    started: float
    step: int = 0
    resumed_from: int = 0
    seconds_before: float = 0.0
    cpu_started: float = field(default_factory=time.process_time)
    cpu_before: float = 0.0
    losses: list[dict[str, float]] = field(default_factory=list)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    cache: TeacherTopK | None = None
    cache_seconds: float = 0.0
    checkpoint: Path | None = None
    stopped_early: bool = False

    def step_window_ids(self, step: int) -> list[list[int]]:
        """This process's micro-batches at ``step``: lists of window ids, fixed by (seed, step)."""
        cfg, acc = self.config, self.accelerator
        per_process = cfg.batch_size * cfg.grad_accum
        start = (step * acc.num_processes + acc.process_index) * per_process
        ids = stream_windows(len(self.windows), cfg.seed, start, per_process)
        return [ids[i : i + cfg.batch_size] for i in range(0, per_process, cfg.batch_size)]


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _check_inputs(student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, config: DistillConfig) -> None:
    if teacher is student:
        raise LeanLMError("the teacher must be a separate model from the student (load a second copy)")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        raise LeanLMError("windows must be a (num_windows, seq_len) integer tensor of token ids")
    if windows.shape[0] == 0 or windows.shape[1] != config.seq_len:
        raise LeanLMError(f"windows have shape {tuple(windows.shape)} but seq_len is {config.seq_len}")
    vocab = getattr(getattr(student, "config", None), "vocab_size", None)
    if vocab is not None and int(windows.max()) >= vocab:
        raise LeanLMError(f"windows hold token id {int(windows.max())}, outside the model's vocabulary of {vocab}")
    if not _trainable(student):
        raise LeanLMError("the student has no trainable parameters: add LoRA (add_lora) or call train_only first")


def _setup(student, teacher, windows, config, out_dir, eval_fn) -> _Run:
    bf16 = auto_bf16() if config.bf16 is None else config.bf16
    accelerator = make_accelerator(bf16, cpu=next(student.parameters()).device.type == "cpu")
    set_seed(config.seed)
    params = list(_trainable(student).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    student.train()
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if teacher is not None:
        teacher.eval().to(accelerator.device)
    return _Run(
        config=config, out_dir=out_dir, accelerator=accelerator, student=student, teacher=teacher,
        windows=windows, optimizer=optimizer, scheduler=scheduler, eval_fn=eval_fn,
        fingerprint=windows_fingerprint(windows), bf16=bf16, started=time.monotonic(),
    )  # fmt: skip


def _state(run: _Run) -> dict:
    return {
        "losses": run.losses,
        "eval_curve": run.eval_curve,
        "step_seconds": run.step_seconds,
        "seconds": run.seconds_before + time.monotonic() - run.started,
        "cpu_seconds": _cpu_seconds(run),
        "config": asdict(run.config),
        "bf16": run.bf16,
        "num_processes": run.accelerator.num_processes,
        "fingerprint": run.fingerprint,
        "trainable": sorted(_trainable(run.accelerator.unwrap_model(run.student))),
    }


def _save(run: _Run) -> None:
    run.accelerator.wait_for_everyone()
    path = run.out_dir / "checkpoint" / f"step-{run.step:06d}"
    if run.accelerator.is_main_process:
        trainable = _trainable(run.accelerator.unwrap_model(run.student))
        path = save_checkpoint(run.out_dir, run.step, trainable, run.optimizer, run.scheduler, _state(run))
        log.info("checkpoint at step %d: %s", run.step, path)
    run.checkpoint = path


def _check_resumable(run: _Run, state: dict, path: Path) -> None:
    now = _state(run)
    changed = [f for f in TRAJECTORY_FIELDS if state["config"].get(f) != now["config"][f]]
    changed += [key for key in ("bf16", "num_processes", "fingerprint", "trainable") if state.get(key) != now[key]]
    if changed:
        raise LeanLMError(
            f"cannot resume from '{path}': this run differs in {', '.join(changed)}; "
            "use the same settings, data and trainable parameters, or a new output directory"
        )


def _restore(run: _Run, path: Path) -> None:
    saved = load_checkpoint(path)
    state = saved["state"]
    _check_resumable(run, state, path)
    trainable = _trainable(run.accelerator.unwrap_model(run.student))
    with torch.no_grad():
        for name, tensor in saved["trainable"].items():
            trainable[name].copy_(tensor)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    restore_rng(saved["rng"])
    run.step = run.resumed_from = state["step"]
    run.losses, run.step_seconds = state["losses"], state["step_seconds"]
    run.eval_curve = [tuple(pair) for pair in state["eval_curve"]]
    run.seconds_before = state["seconds"]
    run.cpu_before = state.get("cpu_seconds", 0.0)
    run.checkpoint = path
    log.info("resumed from %s at step %d", path, run.step)


def _prepare_cache(run: _Run) -> None:
    """Load or build the teacher's top-k cache for every window this process will ever visit."""
    cfg, acc = run.config, run.accelerator
    needed = [i for step in range(cfg.steps) for batch in run.step_window_ids(step) for i in batch]
    path = run.out_dir / f"teacher_top{cfg.top_k_teacher}-rank{acc.process_index}.safetensors"
    cache = TeacherTopK.load(path, run.fingerprint, cfg.top_k_teacher)
    if cache is None or not cache.covers(needed):
        if run.teacher is None:
            raise LeanLMError("no teacher given and no matching top-k cache in the output directory")
        began = time.monotonic()
        cache = build_teacher_topk(run.teacher, run.windows, needed, cfg.top_k_teacher, cfg.batch_size, acc)
        cache.save(path, run.fingerprint)
        run.cache_seconds = time.monotonic() - began
    run.cache = cache


def _micro_step(run: _Run, ids: list[int]) -> torch.Tensor:
    """Forward and backward one micro-batch; returns its (total, kd, ce) for the log."""
    cfg, acc = run.config, run.accelerator
    input_ids = run.windows[ids].to(acc.device)  # (batch, seq_len)
    if run.cache is not None:
        values, indices = run.cache.lookup(ids)  # (batch, seq_len, k) each
        teacher = (values.to(acc.device), indices.to(acc.device))
    else:
        with torch.no_grad(), acc.autocast():
            teacher = run.teacher(input_ids=input_ids, use_cache=False).logits  # (batch, seq_len, vocab)
    logits = run.student(input_ids=input_ids, use_cache=False).logits  # autocast by prepare(); float32 out
    if run.cache is not None:
        loss, parts = kd_loss_topk(logits, *teacher, input_ids, cfg.alpha, cfg.temperature)
    else:
        loss, parts = kd_loss(logits, teacher, input_ids, cfg.alpha, cfg.temperature)
    del logits, teacher  # drop our references to the (batch, seq_len, vocab) tensors before backward
    acc.backward(loss / cfg.grad_accum)
    return torch.stack([loss.detach(), parts["kd"], parts["ce"]]).float()


def _train_step(run: _Run) -> dict[str, float]:
    cfg, acc = run.config, run.accelerator
    micro_batches = run.step_window_ids(run.step)
    run.optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(3, device=acc.device)
    for i, ids in enumerate(micro_batches):
        # Skip the gradient all-reduce on all but the last micro-batch (a no-op on one process).
        sync = contextlib.nullcontext() if i == len(micro_batches) - 1 else acc.no_sync(run.student)
        with sync:
            totals += _micro_step(run, ids)
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(run.student.parameters(), cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    totals = acc.reduce(totals / len(micro_batches), reduction="mean")
    return dict(zip(("total", "kd", "ce"), totals.tolist()))


def _evaluate(run: _Run) -> None:
    run.accelerator.wait_for_everyone()
    if not run.accelerator.is_main_process:
        return
    model = run.accelerator.unwrap_model(run.student)
    model.eval()
    with torch.no_grad():
        value = float(run.eval_fn(model))
    model.train()
    run.eval_curve.append((run.step, value))


def _cpu_seconds(run: _Run) -> float:
    return run.cpu_before + time.process_time() - run.cpu_started


def _out_of_time(run: _Run) -> bool:
    cfg = run.config
    if cfg.max_minutes is None and cfg.max_cpu_minutes is None:
        return False
    over = cfg.max_minutes is not None and time.monotonic() - run.started > cfg.max_minutes * 60
    over = over or (cfg.max_cpu_minutes is not None and _cpu_seconds(run) > cfg.max_cpu_minutes * 60)
    # Every process must stop at the same step: stop if any one is over.
    flag = run.accelerator.reduce(torch.tensor(float(over), device=run.accelerator.device), reduction="sum")
    return bool(flag.item() > 0)


def _loop(run: _Run) -> None:
    cfg = run.config
    bar = tqdm(total=cfg.steps, initial=run.step, desc="distill", unit="step", disable=not run.accelerator.is_local_main_process)
    if cfg.eval_every and run.step == 0:
        _evaluate(run)  # the starting point of the eval curve
    while run.step < cfg.steps:
        began = time.monotonic()
        parts = _train_step(run)
        run.step += 1
        run.step_seconds.append(time.monotonic() - began)
        run.losses.append({"step": run.step, **parts})
        bar.update(1)
        bar.set_postfix(loss=f"{parts['total']:.4f}", kd=f"{parts['kd']:.4f}", ce=f"{parts['ce']:.3f}")
        out_of_time = _out_of_time(run) and run.step < cfg.steps
        last = run.step == cfg.steps or out_of_time
        if cfg.eval_every and (run.step % cfg.eval_every == 0 or last):
            _evaluate(run)
        stop = stop_requested() and not last  # Ctrl-C / SIGTERM under stop_on_signals: keep this step
        if last or stop or (cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0):
            _save(run)
        if stop:
            bar.close()
            raise Interrupted(f"interrupted at step {run.step} of {cfg.steps}: checkpoint saved in {run.checkpoint}; "
                              "run the same command with --resume to continue")
        if out_of_time:
            run.stopped_early = True
            log.warning("time budget reached (max_minutes=%s, max_cpu_minutes=%s): stopped after step %d of %d",
                        cfg.max_minutes, cfg.max_cpu_minutes, run.step, cfg.steps)
            break
    bar.close()


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: torch.Tensor,
    config: DistillConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    eval_fn: Callable[[nn.Module], float] | None = None,
) -> DistillResult:
    """Train the student's trainable parameters to match the teacher on ``windows`` (num_windows, seq_len).

    The student is trained in place (its LoRA adapters, or what ``train_only`` left trainable); the
    teacher runs in eval mode under no_grad, or not at all once a top-k cache exists (then it may be
    None). ``eval_fn(model) -> float`` is called on the main process every ``eval_every`` steps, with
    the student as trained (under the training autocast). ``resume=True`` continues from the latest
    checkpoint in ``out_dir`` (or starts fresh if there is none).
    """
    config = config or DistillConfig()
    config.check()
    out = Path(out_dir or config.out_dir or "")
    if not (out_dir or config.out_dir):
        raise LeanLMError("distill needs an output directory for its checkpoints (out_dir)")
    if config.eval_every and eval_fn is None:
        raise LeanLMError("eval_every is set but no eval_fn was given")
    _check_inputs(student, teacher, windows, config)
    windows = windows.long()  # embeddings take int32 too, but cross_entropy wants int64 labels
    found = latest_checkpoint(out)
    if found is not None and not resume:
        raise LeanLMError(f"'{out}' already holds a checkpoint ({found.name}); pass resume=True or pick a new output directory")
    if teacher is None and config.top_k_teacher == 0:
        raise LeanLMError("a teacher model is needed unless top_k_teacher > 0 and its cache exists")
    if config.top_k_teacher and config.temperature > 1:
        log.warning(
            "top_k_teacher=%d with temperature %.1f: the cached top-k hold little of the tempered teacher "
            "(SmolLM2: top-64 hold 26%% of it at T=2, 90%% at T=1); prefer temperature 1",
            config.top_k_teacher, config.temperature,
        )  # fmt: skip
    was_training = student.training
    run = _setup(student, teacher, windows, config, out, eval_fn)
    try:
        if found is not None:
            _restore(run, found)
        with widened_linears(run.student, run.teacher):  # float32 GEMMs where the CPU has no bf16 ones
            if config.top_k_teacher and run.step < config.steps:
                _prepare_cache(run)
            _loop(run)
    finally:
        # Give the caller back a plain model: drop accelerate's autocast wrapper around forward().
        run.accelerator.unwrap_model(run.student, keep_fp32_wrapper=False).train(was_training)
    return _result(run)


def _result(run: _Run) -> DistillResult:
    cfg = run.config
    return DistillResult(
        steps_done=run.step,
        seconds=run.seconds_before + time.monotonic() - run.started,
        losses=run.losses,
        eval_curve=run.eval_curve,
        stopped_early=run.stopped_early,
        checkpoint=str(run.checkpoint) if run.checkpoint else None,
        step_seconds=run.step_seconds,
        teacher_cache_seconds=run.cache_seconds,
        tokens_per_step=cfg.batch_size * cfg.grad_accum * run.accelerator.num_processes * cfg.seq_len,
        resumed_from=run.resumed_from,
        bf16=run.bf16,
        cpu_seconds=_cpu_seconds(run),
    )
