"""Recovery after compression: LoRA adapters (peft) and knowledge distillation (accelerate-ready loop)."""

from leanlm.recover.distill import (
    DistillConfig,
    DistillResult,
    TeacherTopK,
    auto_bf16,
    bf16_supported,
    distill,
    kd_loss,
    kd_loss_topk,
    plot_loss_curve,
    train_only,
    training_windows,
)
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
