"""``DistillConfig`` (every setting of a distillation run) and ``DistillResult`` (what it returns)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from leanlm.errors import LeanLMError
from leanlm.recover.losses import check_mix


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
    max_cpu_minutes: float | None = field(
        default=None,
        metadata={"help": "CPU budget: process CPU time (all threads, teacher included, resumed sessions added up); "
                          "stop cleanly after the step that crosses it. Honest on a shared machine, unlike wall time"},
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
        for name in ("max_minutes", "max_cpu_minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise LeanLMError(f"{name} must be positive when set, got {getattr(self, name)}")
        check_mix(self.alpha, self.temperature)


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
    stopped_early: bool  # max_minutes or max_cpu_minutes ran out before config.steps
    checkpoint: str | None  # directory of the last checkpoint
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step (teacher included)
    teacher_cache_seconds: float = 0.0  # building the top-k cache (0 when live or reused)
    tokens_per_step: int = 0  # input tokens per optimizer step, all processes
    resumed_from: int = 0  # step the last session started at
    bf16: bool = False
    cpu_seconds: float = 0.0  # process CPU time over all sessions of the run (all threads)

    def to_dict(self) -> dict:
        return asdict(self)
