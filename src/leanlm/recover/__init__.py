"""Recovery after compression: LoRA adapters (peft) and knowledge distillation (accelerate-ready loop)."""

from leanlm.recover.config import DistillConfig, DistillResult
from leanlm.recover.distill import auto_bf16, bf16_supported, distill, train_only
from leanlm.recover.losses import kd_loss, kd_loss_topk
from leanlm.recover.teacher_cache import TeacherTopK
from leanlm.recover.windows import training_windows
from leanlm.report.loss_plot import plot_loss_curve
from leanlm.recover.lora import LoraSettings, add_lora, merge_lora, parameter_counts

__all__ = [
    "DistillConfig",
    "DistillResult",
    "LoraSettings",
    "TeacherTopK",
    "add_lora",
    "auto_bf16",
    "bf16_supported",
    "distill",
    "kd_loss",
    "kd_loss_topk",
    "merge_lora",
    "parameter_counts",
    "plot_loss_curve",
    "train_only",
    "training_windows",
]
