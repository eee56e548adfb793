"""The OpenAI-compatible HTTP app (FastAPI): routes, OpenAI-style errors, SSE streaming.

    app = create_app(served)         # a Served: name, tokenizer, scheduler, limits
    uvicorn.run(app, host="127.0.0.1", port=8000)

Bodies are parsed by pydantic in strict JSON mode (``schema.py``), so a malformed body is a 400 with
one sentence, never a 422 or a 500. Every request watches its client: a disconnect cancels its
sequence and frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from leanlm.serve.jobs import APIError, Job, Served
from leanlm.serve.schema import ChatRequest, CompletionRequest, first_error
from leanlm.serve.text import chat_prompt

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.05


def create_app(served: Served, shutdown_timeout: float = 10.0) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not served.scheduler.thread.is_alive():
            served.scheduler.start()
        yield
        in_flight = len(served.scheduler.running) + len(served.scheduler.waiting)
        served.scheduler.stop(shutdown_timeout)  # cancels what is still in flight
        log.warning("leanlm serve: stopped; %d request(s) in flight were cancelled", in_flight)

    app = FastAPI(title="leanlm", lifespan=lifespan)
    app.state.served = served
    _error_handlers(app, served)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(served.scheduler.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": served.created,
                                            "owned_by": "leanlm", "max_model_len": served.max_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await request.body(), served)
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], (str, list)) \
            else req.prompt
        ids = served.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "The prompt is empty after tokenization.")
        job = Job(served, req, ids, req.max_tokens)
        if req.stream:
            return _sse(job, _completion_events(job))
        text, finish = await _collect(request, job)
        return job.completion(text, finish)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = _parse(ChatRequest, await request.body(), served)
        job = Job(served, req, chat_prompt(served.tokenizer, req.messages), req.token_limit())
        if req.stream:
            return _sse(job, _chat_events(job))
        text, finish = await _collect(request, job)
        return job.chat(text, finish)

    return app


def _parse(model_class, body: bytes, served: Served):
    try:
        req = model_class.model_validate_json(body)
    except ValidationError as error:
        raise APIError(400, first_error(error)) from None
    if req.model != served.name:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{served.name}'.",
                       code="model_not_found")
    return req


def _error_handlers(app: FastAPI, served: Served) -> None:
    def respond(error: APIError) -> JSONResponse:
        served.scheduler.metrics.count_request(f"http_{error.status}")
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return respond(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return respond(APIError(error.status_code, f"{error.detail} ({request.method} {request.url.path}).", kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return respond(APIError(400, f"Invalid request: {error.errors()[0].get('msg', 'bad value')}."))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        log.exception("unhandled error")
        return respond(APIError(500, f"Internal error: {type(error).__name__}.", kind="server_error"))


async def _watch(request: Request, job: Job) -> None:
    """Cancel ``job`` as soon as its client disconnects."""
    while True:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _collect(request: Request, job: Job) -> tuple[str, str]:
    watcher = asyncio.create_task(_watch(request, job))
    parts, finish = [], "length"
    try:
        async for piece, reason in job.pieces():
            parts.append(piece)
            finish = reason or finish
    finally:
        watcher.cancel()
        job.cancel()  # no-op when finished; frees the slot if the handler itself was cancelled
    job.served.scheduler.metrics.count_request(finish)
    return "".join(parts), finish


def _sse(job: Job, events) -> StreamingResponse:
    async def body():  # starlette listens for the disconnect and cancels this generator (then: finally)
        try:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
            except APIError as error:
                yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            with suppress(Exception):
                job.cancel()  # no-op when finished; frees the slot when the client went away

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _completion_events(job: Job):
    async for piece, finish in job.pieces():
        if piece or finish:
            yield job.completion_chunk(piece, finish)
        if finish:
            job.served.scheduler.metrics.count_request(finish)
    if job.req.include_usage:
        yield job.usage_chunk("text_completion")


async def _chat_events(job: Job):
    yield job.chat_chunk({"role": "assistant", "content": ""}, None)
    async for piece, finish in job.pieces():
        if piece:
            yield job.chat_chunk({"content": piece}, None)
        if finish:
            job.served.scheduler.metrics.count_request(finish)
            yield job.chat_chunk({}, finish)
    if job.req.include_usage:
        yield job.usage_chunk("chat.completion.chunk")
