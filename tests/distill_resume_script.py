"""Helper for tests/test_recover.py (not a test): the run that gets killed, and the shared setup.

`python tests/distill_resume_script.py OUT_DIR STALL_STEP` distills the tiny setup of `build()` and,
right after writing the checkpoint of STALL_STEP, prints "checkpoint STALL_STEP" and hangs, so the
test can SIGKILL it at a known point. The stall is patched in here; the library has no test hook.
"""

from __future__ import annotations

import importlib
import sys
import time

import torch

from leanlm.models import tiny_llama
from leanlm.recover import DistillConfig, LoraSettings, add_lora


def build():
    """(student with LoRA, teacher, windows, config): identical on every call and in every process.

    bf16 autocast is on, so resume is also checked through accelerate's mixed-precision path.
    """
    teacher = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    student = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2)
    noise = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=noise))
    student = add_lora(student, LoraSettings(rank=4, seed=0))
    windows = torch.randint(0, 256, (10, 16), generator=torch.Generator().manual_seed(1))
    config = DistillConfig(steps=6, batch_size=2, seq_len=16, grad_accum=2, lr=1e-2, warmup_steps=1, checkpoint_every=2, bf16=True)
    return student, teacher, windows, config


def main(out_dir: str, stall_step: int) -> None:
    # import_module: the attribute leanlm.recover.distill is the function, not the module.
    distill_module = importlib.import_module("leanlm.recover.distill")

    real_save = distill_module.save_checkpoint

    def save_then_stall(out, step, *args, **kwargs):
        path = real_save(out, step, *args, **kwargs)
        if step == stall_step:
            print(f"checkpoint {step}", flush=True)
            time.sleep(600)  # the test kills us here
        return path

    distill_module.save_checkpoint = save_then_stall
    torch.set_num_threads(1)  # as in the test process: the same thread count gives the same sums
    student, teacher, windows, config = build()
    distill_module.distill(student, teacher, windows, config, out_dir)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
