"""A process-wide on/off setting with a context manager for A/B runs (kernels, lean step, C++ wrapper, widening)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Switch:
    """``bool(switch)`` reads it; ``with switch.set(False):`` changes it for a block and restores it after."""

    def __init__(self, on: bool = True):
        self.on = on

    def __bool__(self) -> bool:
        return self.on

    @contextlib.contextmanager
    def set(self, enabled: bool) -> Iterator[None]:
        before = self.on
        self.on = enabled
        try:
            yield
        finally:
            self.on = before
