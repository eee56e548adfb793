"""Put a model behind the app: backend + scheduler + app, and run it under uvicorn."""

from __future__ import annotations

import logging
import socket

import uvicorn

from leanlm.engine.decode import model_context
from leanlm.errors import LeanLMError
from leanlm.serve.app import create_app
from leanlm.serve.backends import PolicyBackend, SlotBackend
from leanlm.serve.jobs import Served
from leanlm.serve.metrics import Metrics
from leanlm.serve.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)


def eos_ids(model, tokenizer) -> frozenset[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) if getattr(model, "generation_config", None) else None
    ids = ids if ids is not None else tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return frozenset(ids)


def build_served(model, tokenizer, name: str, config: SchedulerConfig | None = None, kv_policy=None,
                 kv_budget: float = 0.25, max_cache_bytes: int | None = None) -> Served:
    """A ``Served`` (model behind a scheduler, not started yet). ``kv_policy``: a leanlm CachePolicy, run
    at batch 1 per sequence (see ``backends``); None: the batched slot cache."""
    config = config or SchedulerConfig()
    context = model_context(model)
    if config.max_len > context:
        log.info("--max-len %d is beyond the model's context; using %d", config.max_len, context)
        config.max_len = context
    if config.max_batch < 1 or config.max_queue < 0 or config.prefill_chunk < 1:
        raise LeanLMError("--max-batch and --prefill-chunk must be >= 1 and --max-queue >= 0")
    if kv_policy is None:
        backend = SlotBackend(model, config.max_batch, config.max_len, max_cache_bytes)
        config.max_batch = backend.slots
    else:
        backend = PolicyBackend(model, kv_policy, kv_budget, max_cache_bytes)
    metrics = Metrics()
    metrics.set_state(cache_capacity_bytes=backend.capacity_bytes)
    scheduler = Scheduler(model, backend, config, metrics)
    return Served(name=name, tokenizer=tokenizer, scheduler=scheduler, max_len=config.max_len,
                  vocab_size=model.config.vocab_size, eos_ids=eos_ids(model, tokenizer))


def make_server(served: Served, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 10.0,
                log_level: str = "warning") -> uvicorn.Server:
    app = create_app(served, shutdown_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            access_log=False)
    return uvicorn.Server(config)


def bound_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0: an ephemeral port; read it from ``getsockname()``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
