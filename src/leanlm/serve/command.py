"""`leanlm serve`: an OpenAI-compatible server (FastAPI + uvicorn) with continuous batching."""

from __future__ import annotations

import argparse
import logging

from leanlm.cli_types import positive_int

log = logging.getLogger("leanlm")

def add_parser(sub) -> argparse.ArgumentParser:
    """The `serve` sub-command's own options; `cli.py` adds the shared --model/--dtype/--device and --kv-* ones."""
    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with continuous batching",
                        description="Serve /v1/completions, /v1/chat/completions, /v1/models, /health and /metrics "
                                    "(Prometheus). Examples: see the end of this help.")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: %(default)s)")
    sv.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    sv.add_argument("--max-batch", type=positive_int, default=8, help="most sequences decoding at once (default: %(default)s)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="most requests waiting for a slot; beyond it the server answers 429 (default: %(default)s)")
    sv.add_argument("--max-len", type=positive_int, default=2048,
                    help="most tokens (prompt + generated) per sequence; sizes the slot cache (default: %(default)s)")
    sv.add_argument("--prefill-chunk", type=positive_int, default=128,
                    help="prompt tokens prefilled between two decode steps (default: %(default)s)")
    sv.add_argument("--max-cache-bytes", type=positive_int, default=None,
                    help="cap on KV-cache bytes: fewer slots with the full cache, admission control with a policy")
    sv.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    sv.add_argument("--shutdown-timeout", type=float, default=10.0,
                    help="on SIGTERM, seconds to let in-flight requests finish before they are cancelled")
    return sv


def run(args: argparse.Namespace) -> int:
    import torch

    from leanlm.commands import policy_from_args
    from leanlm.models import load_model, load_tokenizer
    from leanlm.serve.scheduler import SchedulerConfig
    from leanlm.serve.server import bound_socket, build_served, make_server

    if args.threads:
        torch.set_num_threads(args.threads)
    policy_from_args(args)  # a bad policy fails before the model loads
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.dtype, args.device)
    policy = policy_from_args(args, tokenizer, model)
    config = SchedulerConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_len=args.max_len,
                             prefill_chunk=args.prefill_chunk)
    served = build_served(model, tokenizer, args.served_model_name or args.model, config, policy,
                          args.kv_budget or 0.25, args.max_cache_bytes)
    sock = bound_socket(args.host, args.port)
    host, port = sock.getsockname()[:2]
    mode = "one batched forward per step" if policy is None else f"{args.kv_cache} cache, batch 1 per sequence"
    log.info("leanlm serve: %s as '%s' on http://%s:%d (max batch %d, %s)", args.model, served.name, host, port,
             config.max_batch, mode)
    print(f"serving on http://{host}:{port}", flush=True)  # a parent process reads this line
    make_server(served, host, port, args.shutdown_timeout, "warning").run(sockets=[sock])
    return 0
