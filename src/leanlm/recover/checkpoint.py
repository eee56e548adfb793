"""Training checkpoints that a killed run can resume from, written atomically.

Layout: ``out_dir/checkpoint/step-000040/`` holding
    trainable.safetensors  trainable parameters only (name -> tensor); the frozen base is the caller's
    optimizer.pt, scheduler.pt
    rng.pt                 torch CPU (and CUDA) generator states
    state.json             step, loss history, eval curve, seconds, the config and data fingerprint
Each step directory is built under a temporary name and renamed into place, so a reader sees a whole
checkpoint or none; older steps are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from leanlm.errors import LeanLMError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler, state: dict
) -> Path:
    """Write checkpoint ``step`` atomically and delete the older ones; returns its directory."""
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:06d}"
    if target.exists():  # the same step saved again (a resumed run that had nothing left to do)
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary output folder
    try:
        save_file({name: t.detach().contiguous().cpu() for name, t in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1), encoding="utf-8")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for older in _step_dirs(root):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)
    return target


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoint``, or None."""
    dirs = _step_dirs(Path(out_dir) / CHECKPOINT_DIR)
    return dirs[-1] if dirs else None


def load_checkpoint(path: Path) -> dict:
    """Everything ``save_checkpoint`` wrote, as tensors and plain objects (nothing applied yet)."""
    path = Path(path)
    try:
        return {
            "trainable": load_file(path / "trainable.safetensors"),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
            "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
            # weights_only: a ByteTensor and python's tuple of ints load without unpickling code.
            "rng": torch.load(path / "rng.pt", weights_only=True),
            "state": json.loads((path / "state.json").read_text(encoding="utf-8")),
        }
    except (OSError, ValueError, RuntimeError) as err:
        raise LeanLMError(f"checkpoint '{path}' is unreadable or incomplete: {err}") from err


# ------------------------------------------------------------------ stop on Ctrl-C / SIGTERM

_STOP = threading.Event()


def stop_requested() -> bool:
    """Whether a signal asked the training loop to checkpoint and stop (checked once per step)."""
    return _STOP.is_set()


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """While active, the first SIGINT/SIGTERM only asks the loop to stop after the current step.

    The loop then saves a checkpoint and raises ``leanlm.errors.Interrupted`` (the CLI exits 130).
    A second signal interrupts at once (KeyboardInterrupt), losing only the current step.
    """
    def handler(signum, frame):
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set()
        log.warning("leanlm: %s: saving a checkpoint after this step, then stopping (again to stop at once)",
                    signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    _STOP.clear()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _STOP.clear()
