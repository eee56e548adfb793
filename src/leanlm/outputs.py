"""Where a run writes by default: ``runs/<kind>-<model>-<timestamp>/`` (shared by the CLI and its commands)."""

from __future__ import annotations

import time
from pathlib import Path


def default_out(kind: str, model: str) -> Path:
    name = Path(model).name.replace("/", "_") or "model"
    return Path("runs") / f"{kind}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
