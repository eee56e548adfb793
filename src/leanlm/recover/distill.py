"""Knowledge distillation: recover a compressed student by matching the original model (the teacher).

Loss per next-token position (float32, like torchtune's KD recipe):
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, label)
The T^2 factor keeps the KD gradients on the same scale for any temperature (Hinton et al., 2015).

The loop is written against `accelerate` (prepare / backward / autocast / is_main_process), so it
runs unchanged under `accelerate launch` or `torchrun`. It is resumable: checkpoints hold the
trainable parameters, optimizer, scheduler, RNG and loss history, and the batch of every step is
fixed by (seed, step), so a killed and resumed run ends bit-for-bit where an uninterrupted one does
(on CPU; tested).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from leanlm.data import tokenize_split
from leanlm.errors import LeanLMError
from leanlm.recover.checkpoint import latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that is not scored (the Hugging Face convention)


# ----------------------------------------------------------------------------------------- losses


def _next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align for next-token prediction as HF does: logits[:, t] predict labels[:, t + 1].

    Returns the scored positions' logits (tokens, vocab), their labels (tokens,) and the mask
    (batch, seq - 1) of positions whose label is not IGNORE_INDEX.
    """
    targets = labels[:, 1:]  # (batch, seq - 1)
    keep = targets != IGNORE_INDEX
    return logits[:, :-1][keep], targets[keep], keep


def _check_mix(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise LeanLMError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise LeanLMError(f"temperature must be positive, got {temperature}")


def _combine(kl: torch.Tensor, student: torch.Tensor, targets: torch.Tensor, alpha: float, temperature: float):
    """Mix the per-token KL (tokens,) with CE on the labels; both averaged over scored tokens."""
    count = max(targets.numel(), 1)  # "batchmean" over tokens, not over sequences
    kd = kl.sum() / count
    # A term whose weight is 0 is still computed for the log, but outside the autograd graph.
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1):
        ce = F.cross_entropy(student, targets, reduction="sum") / count
    loss = alpha * temperature**2 * kd + (1 - alpha) * ce
    return loss, {"kd": kd.detach(), "ce": ce.detach()}


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KD loss on full teacher logits; all (batch, seq, vocab), labels (batch, seq), shifted inside.

    KL(p_teacher^T || p_student^T) is summed over the vocabulary and averaged over the scored token
    positions (batchmean over tokens; positions whose next label is -100 are skipped, for KL and CE
    alike). Returns (loss, {"kd": KL at temperature T, unscaled; "ce": cross-entropy}).
    """
    _check_mix(alpha, temperature)
    if student_logits.shape != teacher_logits.shape:
        shapes = f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        raise LeanLMError(f"student and teacher logits differ in shape: {shapes}")
    student, targets, keep = _next_token(student_logits, labels)
    student = student.float()  # (tokens, vocab)
    teacher = teacher_logits[:, :-1][keep].float()  # (tokens, vocab)
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0):
        log_p_student = F.log_softmax(student / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (tokens,)
    return _combine(kl, student, targets, alpha, temperature)


def kd_loss_topk(
    student_logits: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KD loss against a cached teacher: its k largest logits per position, (batch, seq, k) each.

    Approximation: the teacher distribution is the softmax of its top-k logits / T, renormalised
    over those k tokens (the tail's mass is dropped); the student keeps its full-vocabulary
    log_softmax, read at the same k tokens. The result is sum_k p_t (log p_t - log q_s), which is
    >= 0 and equals the exact KL when k is the vocabulary size. Because q_s is not renormalised, the
    student is pushed to move its tail mass onto the teacher's top k, so with a flat teacher (or a
    small k) the value sits above the exact KL by about -log(student mass on the top k). With a
    peaked LM teacher and k of 32-64 the dropped tail is small at T = 1, not at T > 1: on SmolLM2-135M
    (WikiText-2) the top 64 logits hold 90% of the teacher's mass at T = 1 but 26% at T = 2.
    """
    _check_mix(alpha, temperature)
    student, targets, keep = _next_token(student_logits, labels)
    student = student.float()  # (tokens, vocab)
    values = teacher_topk_values[:, :-1][keep].float()  # (tokens, k)
    indices = teacher_topk_indices[:, :-1][keep].long()  # (tokens, k)
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha > 0):
        log_p_student = F.log_softmax(student / temperature, dim=-1).gather(-1, indices)  # (tokens, k)
        log_p_teacher = F.log_softmax(values / temperature, dim=-1)  # renormalised over the top k
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (tokens,)
    return _combine(kl, student, targets, alpha, temperature)


# ------------------------------------------------------------------------------ config and result


@dataclass
class DistillConfig:
    """Settings of a distillation run. Fields marked (trajectory) must match when resuming."""

    steps: int = field(default=200, metadata={"help": "optimizer steps to train (trajectory)"})
    batch_size: int = field(default=4, metadata={"help": "windows per micro-batch and process (trajectory)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training window (trajectory)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step (trajectory)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate of AdamW (trajectory)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (trajectory)"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up before the cosine decay (trajectory)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this; 0 = no clipping (trajectory)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the KD term; 1 - alpha weighs CE on the labels (trajectory)"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature T of the KD term (trajectory)"})
    seed: int = field(default=0, metadata={"help": "seeds the data order and torch RNG (trajectory)"})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast; None = auto: on with a bf16 GPU, off on CPU (see auto_bf16) (trajectory)"},
    )
    checkpoint_every: int = field(
        default=50, metadata={"help": "save a checkpoint every N steps (and at the end); 0 = only at the end"}
    )
    eval_every: int = field(default=0, metadata={"help": "call eval_fn every N steps (and at steps 0 and last); 0 = off"})
    top_k_teacher: int = field(
        default=0,
        metadata={
            "help": "0 = run the teacher live every step; k > 0 = cache its top-k logits once and never run it "
            "again; use temperature 1 with it (trajectory)"
        },
    )
    max_minutes: float | None = field(
        default=None, metadata={"help": "wall-clock budget: stop cleanly after the step that crosses it"}
    )
    out_dir: str | None = field(default=None, metadata={"help": "where checkpoints go (the distill() argument wins)"})

    def check(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "lr")
        for name in positive:
            if getattr(self, name) <= 0:
                raise LeanLMError(f"distill {name} must be positive, got {getattr(self, name)}")
        non_negative = ("weight_decay", "warmup_steps", "max_grad_norm", "checkpoint_every", "eval_every", "top_k_teacher")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise LeanLMError(f"distill {name} must not be negative, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise LeanLMError(f"distill seq_len must be at least 2, got {self.seq_len}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise LeanLMError(f"max_minutes must be positive when set, got {self.max_minutes}")
        _check_mix(self.alpha, self.temperature)


TRAJECTORY_FIELDS = (
    "steps", "batch_size", "seq_len", "grad_accum", "lr", "weight_decay", "warmup_steps",
    "max_grad_norm", "alpha", "temperature", "seed", "top_k_teacher",
)  # fmt: skip


@dataclass
class DistillResult:
    """What a run did. Losses are per optimizer step, averaged over its micro-batches (and processes)."""

    steps_done: int
    seconds: float  # wall clock over all sessions of the run (a resumed run adds up)
    losses: list[dict[str, float]]  # per step: {"step", "total", "kd", "ce"}
    eval_curve: list[tuple[int, float]]  # (step, eval_fn value)
    stopped_early: bool  # max_minutes ran out before config.steps
    checkpoint: str | None  # directory of the last checkpoint
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step (teacher included)
    teacher_cache_seconds: float = 0.0  # building the top-k cache (0 when live or reused)
    tokens_per_step: int = 0  # input tokens per optimizer step, all processes
    resumed_from: int = 0  # step the last session started at
    bf16: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------- helpers


def bf16_supported() -> bool:
    """Whether the hardware computes in bf16 natively.

    GPU: `torch.cuda.is_bf16_supported()`. CPU: the AVX512-BF16 or AMX instructions (oneDNN then
    runs bf16 matmuls natively; without them bf16 is emulated and slower than float32).
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def auto_bf16() -> bool:
    """What ``bf16=None`` means: autocast on a bf16 GPU, not on CPU.

    On the 2-core AVX512-BF16 CPU this project runs on, autocast over float32 weights was measured
    slower than plain float32 (SmolLM2-135M, batch 4 x 256: forward 9.1 s vs 7.3 s, training step
    about 1.4x slower): each forward re-casts every weight and the element-wise ops bounce between
    dtypes. The CPU speed-up comes from loading both models in bfloat16 instead (a LoRA distill step
    took about 5 s instead of about 15 s); peft keeps the LoRA adapters in float32 on a bf16 base and
    the KD loss is computed in float32 either way.
    """
    return torch.cuda.is_available() and bf16_supported()


def train_only(model: nn.Module, name_patterns: list[str] | tuple[str, ...] | str) -> list[str]:
    """Make exactly the parameters whose name matches a pattern (regex search) trainable.

    E.g. ``train_only(model, ["o_proj"])`` for KD without LoRA on the attention outputs. Returns the
    trainable names; a pattern that matches nothing is an error (it is almost always a typo).
    """
    patterns = [name_patterns] if isinstance(name_patterns, str) else list(name_patterns)
    if not patterns:
        raise LeanLMError("train_only needs at least one parameter name pattern")
    compiled = [re.compile(p) for p in patterns]
    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(c.search(name) for c in compiled))
        if param.requires_grad:
            chosen.append(name)
    names = [name for name, _ in model.named_parameters()]
    for pattern in compiled:
        if not any(pattern.search(name) for name in names):
            raise LeanLMError(f"train_only: pattern '{pattern.pattern}' matches no parameter of the model")
    return chosen


def training_windows(tokenizer, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of WikiText-2 *validation*, (num_windows, seq_len) LongTensor.

    There is deliberately no split argument: training must never see the test split we report on.
    ``limit`` keeps the first windows only.
    """
    if seq_len < 2:
        raise LeanLMError(f"seq_len must be at least 2, got {seq_len}")
    if limit is not None and limit < 1:
        raise LeanLMError(f"limit must be positive when set, got {limit}")
    ids = tokenize_split(tokenizer, "validation")  # (tokens,)
    count = len(ids) // seq_len
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise LeanLMError(f"WikiText-2 validation has {len(ids)} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len).clone()  # (num_windows, seq_len)


@functools.lru_cache(maxsize=8)
def _epoch_order(num_windows: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(num_windows, generator=generator).tolist())


def stream_windows(num_windows: int, seed: int, start: int, count: int) -> list[int]:
    """Window ids at positions start .. start+count-1 of an endless stream of seeded epoch permutations.

    A step's batch is a slice of this stream at an offset fixed by the step, so it depends only on
    (seed, step) and a resumed run sees exactly the batches an uninterrupted one would.
    """
    ids = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_windows)
        ids.append(_epoch_order(num_windows, seed, epoch)[offset])
    return ids


def windows_fingerprint(windows: torch.Tensor) -> str:
    """A short hash of the training windows, so a resume on different data is refused."""
    digest = hashlib.sha256(str(tuple(windows.shape)).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _make_accelerator(bf16: bool) -> Accelerator:
    precision = "bf16" if bf16 else "no"
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps one process-wide state and refuses a second precision. In a single process
        # (a notebook, the tests, a pipeline distilling twice) each call may choose its own, so reset it.
        AcceleratorState._reset_state()
    # The schedule counts optimizer steps, so the scheduler must step once per step on every process.
    return Accelerator(mixed_precision=precision, step_scheduler_with_optimizer=False)


# ----------------------------------------------------------------------------- teacher top-k cache


@dataclass
class TeacherTopK:
    """The teacher's k largest logits at every position of the windows a run visits."""

    window_ids: torch.Tensor  # (n,) which rows of `windows` are cached
    values: torch.Tensor  # (n, seq_len, k) float32 logits
    indices: torch.Tensor  # (n, seq_len, k) int32 vocabulary ids

    def __post_init__(self) -> None:
        self._row = {int(w): i for i, w in enumerate(self.window_ids.tolist())}

    def covers(self, ids: list[int]) -> bool:
        return all(i in self._row for i in ids)

    def lookup(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self._row[i] for i in ids])
        return self.values[rows], self.indices[rows]  # (batch, seq_len, k) each

    def save(self, path: Path, fingerprint: str) -> None:
        tensors = {"window_ids": self.window_ids, "values": self.values, "indices": self.indices}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, tmp, metadata={"fingerprint": fingerprint})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, fingerprint: str, k: int) -> TeacherTopK | None:
        """The cache at ``path`` if it was built from the same windows with the same k, else None."""
        if not path.is_file():
            return None
        with safe_open(path, framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != fingerprint:
                return None
        tensors = load_file(path)
        if tensors["values"].shape[-1] != k:
            return None
        return cls(tensors["window_ids"], tensors["values"], tensors["indices"])


@torch.no_grad()
def build_teacher_topk(
    teacher: nn.Module, windows: torch.Tensor, ids: list[int], k: int, batch_size: int, accelerator: Accelerator
) -> TeacherTopK:
    """Run the teacher once over windows[ids] and keep its top-k logits per position."""
    ids = sorted(set(ids))
    values, indices = [], []
    bar = tqdm(range(0, len(ids), batch_size), desc=f"teacher top-{k}", disable=not accelerator.is_local_main_process)
    for start in bar:
        batch = windows[ids[start : start + batch_size]].to(accelerator.device)  # (batch, seq_len)
        with accelerator.autocast():
            logits = teacher(input_ids=batch, use_cache=False).logits  # (batch, seq_len, vocab)
        top = logits.float().topk(k, dim=-1)
        values.append(top.values.cpu())
        indices.append(top.indices.to(torch.int32).cpu())
        del logits, top  # the full logits are the large tensor here
    return TeacherTopK(torch.tensor(ids), torch.cat(values), torch.cat(indices))


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
    accelerator = _make_accelerator(bf16)
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


def _out_of_time(run: _Run) -> bool:
    if run.config.max_minutes is None:
        return False
    over = time.monotonic() - run.started > run.config.max_minutes * 60
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
        if last or (cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0):
            _save(run)
        if out_of_time:
            run.stopped_early = True
            log.warning("max_minutes=%s reached: stopped after step %d of %d", cfg.max_minutes, run.step, cfg.steps)
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
    )


# ---------------------------------------------------------------------------------------- plot


def plot_loss_curve(result: DistillResult, path: str | Path) -> None:
    """Loss per step (total, KD, CE); the eval curve on a second axis if there is one."""
    import matplotlib  # here, not at the top: it costs a second of import time for every user of distill

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [row["step"] for row in result.losses]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in ("total", "kd", "ce"):
        ax.plot(steps, [row[key] for row in result.losses], linewidth=1, label=f"{key} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if result.eval_curve:
        twin = ax.twinx()
        eval_steps, values = zip(*result.eval_curve)
        twin.plot(eval_steps, values, color="black", marker="o", linewidth=1, label="eval")
        twin.set_ylabel("eval")
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize="small")
    ax.set_title("distillation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # atomic: temp file, then rename
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
