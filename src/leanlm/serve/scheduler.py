"""Continuous batching: one thread owns the model; sequences join and leave the running batch at every step.

Each iteration of the loop (``_iterate``):
1. admits waiting requests, first come first served, while the backend has room (a free slot, or
   cache bytes under the cap) and drops the cancelled ones (a client that went away frees its slot);
2. runs one decode step: ONE batched forward over every sequence that has a next token to feed;
3. prefills ONE chunk (``prefill_chunk`` tokens) of the oldest sequence still prefilling, so a long
   prompt never stalls the running sequences for longer than one chunk.
Tokens go back to each request through its ``deliver`` callback (thread-safe: the HTTP side passes
``loop.call_soon_threadsafe``); the last delivery of a sequence is a ``Finish``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from leanlm.engine.sampling import Sampler, sample_rows
from leanlm.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``: the request is refused (HTTP 429)."""


@dataclass
class Finish:
    reason: str  # "stop" (end-of-text token), "length", "cancelled", "error"
    message: str = ""


@dataclass(eq=False)
class Sequence:
    """One request's generation: its prompt ids, limits and sampler, and where it stands."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    deliver: Callable[[object], None]  # called from the scheduler thread with each token id, then a Finish
    stop_ids: frozenset[int] = frozenset()
    arrival: float = field(default_factory=time.monotonic)
    prefilled: int = 0  # prompt tokens written to the cache
    generated: int = 0
    last_token: int | None = None
    last_time: float = 0.0
    cancelled: bool = False
    slot: int | None = None  # SlotBackend row
    state: object = None  # PolicyBackend DecodeState

    @property
    def position(self) -> int:
        """Text position of the next token to generate."""
        return len(self.prompt) + self.generated


@dataclass
class SchedulerConfig:
    max_batch: int = field(default=8, metadata={"help": "most sequences decoding at once"})
    max_queue: int = field(default=64, metadata={"help": "most requests waiting for a slot; more get 429"})
    max_len: int = field(default=2048, metadata={"help": "most tokens (prompt + generated) per sequence"})
    prefill_chunk: int = field(default=128, metadata={"help": "prompt tokens prefilled between two decode steps"})


class Scheduler:
    def __init__(self, model, backend, config: SchedulerConfig, metrics: Metrics | None = None):
        self.model, self.backend, self.config = model, backend, config
        self.metrics = metrics or Metrics()
        self.device = next(model.parameters()).device
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="leanlm-scheduler", daemon=True)
        self.steps = 0  # decode steps run (tests read it)

    # --- called from the HTTP side -------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(seq)
            self.metrics.set_state(queue_depth=len(self.waiting))
            self.cond.notify()

    def cancel(self, seq: Sequence) -> None:
        with self.cond:
            seq.cancelled = True
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.cond.notify()

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything in flight and end the thread (within ``timeout`` seconds)."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)
        for seq in [*self.waiting, *self.running]:
            seq.deliver(Finish("cancelled", "the server is shutting down"))
        self.waiting.clear()
        self.running.clear()

    # --- the scheduler thread -----------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not self.running:
                    self.cond.wait()
                if self.stopping:
                    return
                self._admit()
            try:
                with torch.inference_mode():
                    self._iterate()
            except Exception as error:  # noqa: BLE001 - a failed step fails its sequences, never the server
                log.exception("a scheduler step failed")
                for seq in list(self.running):
                    self._finish(seq, Finish("error", f"{type(error).__name__}: {error}"))
            self.metrics.set_state(running=len(self.running), queue_depth=len(self.waiting),
                                   cache_bytes=self.backend.held_bytes())

    def _admit(self) -> None:
        """Move waiting sequences into the running batch while there is room (called under the lock)."""
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, Finish("cancelled"))
        while self.waiting and len(self.running) < self.config.max_batch and self.backend.admit(self.waiting[0]):
            self.running.append(self.waiting.popleft())

    def _iterate(self) -> None:
        decoding = [s for s in self.running if s.last_token is not None]
        if decoding:
            tokens = torch.tensor([s.last_token for s in decoding], device=self.device)  # (n,)
            logits = self.backend.decode(decoding, tokens)  # (n, vocab)
            self.steps += 1
            self._emit(decoding, sample_rows([s.sampler for s in decoding], logits).tolist())
        prefilling = [s for s in self.running if s.prefilled < len(s.prompt)]
        if prefilling:
            seq = prefilling[0]
            start, end = seq.prefilled, min(len(seq.prompt), seq.prefilled + self.config.prefill_chunk)
            ids = torch.tensor([seq.prompt[start:end]], device=self.device)  # (1, chunk)
            logits = self.backend.prefill(seq, ids, start)  # (1, vocab)
            seq.prefilled = end
            with self.metrics.lock:
                self.metrics.prompt_tokens += end - start
            if end == len(seq.prompt):
                self._emit([seq], sample_rows([seq.sampler], logits).tolist())

    def _emit(self, seqs: list[Sequence], tokens: list[int]) -> None:
        now = time.monotonic()
        for seq, token in zip(seqs, tokens):
            if seq.cancelled:
                self._finish(seq, Finish("cancelled"))
                continue
            self.metrics.observe("ttft" if seq.generated == 0 else "per_token",
                                 now - (seq.arrival if seq.generated == 0 else seq.last_time))
            seq.generated += 1
            seq.last_token, seq.last_time = token, now
            seq.deliver(token)
            if token in seq.stop_ids:
                self._finish(seq, Finish("stop"))
            elif seq.generated >= seq.max_tokens or seq.position >= self.config.max_len:
                self._finish(seq, Finish("length"))
        self.metrics.tokens(len(tokens), now)

    def _finish(self, seq: Sequence, finish: Finish) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.backend.release(seq)
        if finish.reason != "cancelled":
            self.metrics.observe("e2e", time.monotonic() - seq.arrival)
        seq.deliver(finish)
