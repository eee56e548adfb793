"""One request's life on the HTTP side: checks against the context, its Sequence in the scheduler,
the text it streams back, and the OpenAI response objects built from it."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field

from leanlm.engine.sampling import Sampler, SamplingConfig
from leanlm.serve.scheduler import Finish, QueueFull, Sequence
from leanlm.serve.schema import SamplingFields
from leanlm.serve.text import TextStream


class APIError(Exception):
    """An HTTP error with an OpenAI-style body ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


@dataclass
class Served:
    """What the routes need: the model's name, tokenizer, scheduler and limits."""

    name: str
    tokenizer: object
    scheduler: object
    max_len: int
    vocab_size: int
    eos_ids: frozenset[int]
    created: int = field(default_factory=lambda: int(time.time()))


def sampler_for(req: SamplingFields) -> Sampler:
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    return Sampler(SamplingConfig(temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p, seed=seed))


class Job:
    """A submitted request: tokens arrive from the scheduler thread on an asyncio queue."""

    def __init__(self, served: Served, req: SamplingFields, prompt: list[int], max_tokens: int | None):
        if len(prompt) >= served.max_len:
            raise APIError(400, f"This model's maximum context length is {served.max_len} tokens; the prompt has "
                                f"{len(prompt)} tokens, leaving no room to generate.", code="context_length_exceeded")
        if max(prompt) >= served.vocab_size:
            raise APIError(400, f"Token id {max(prompt)} is outside the vocabulary of {served.vocab_size} tokens.")
        room = served.max_len - len(prompt)
        max_tokens = room if max_tokens is None else max_tokens
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {served.max_len} tokens; the prompt has "
                                f"{len(prompt)} tokens and max_tokens asks for {max_tokens} more.",
                           code="context_length_exceeded")
        self.served, self.req, self.prompt = served, req, prompt
        self.id = uuid.uuid4().hex[:24]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(served.tokenizer, req.stop_strings())
        self.tokens = 0
        loop = asyncio.get_running_loop()
        self.seq = Sequence(prompt, max_tokens, sampler_for(req), lambda item: loop.call_soon_threadsafe(
            self.queue.put_nowait, item), stop_ids=frozenset() if req.ignore_eos else served.eos_ids)
        try:
            served.scheduler.submit(self.seq)
        except QueueFull as full:
            raise APIError(429, f"The server is busy ({full}); retry shortly.", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None

    def cancel(self) -> None:
        self.served.scheduler.cancel(self.seq)

    async def pieces(self):
        """Yield (text piece, finish reason or None) until the sequence ends; raises APIError on failure."""
        while True:
            item = await self.queue.get()
            if isinstance(item, Finish):
                if item.reason == "error":
                    raise APIError(500, f"Generation failed: {item.message}", kind="server_error")
                if item.reason == "cancelled":
                    raise APIError(503, f"The request was cancelled: {item.message or 'cancelled'}.",
                                   kind="server_error", code="cancelled")
                yield self.text.flush(), item.reason
                return
            self.tokens += 1
            piece = self.text.push(item)
            if self.text.stopped:
                self.cancel()  # a stop string ended it: free the slot now
                yield piece, "stop"
                return
            if piece:
                yield piece, None

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.tokens,
                "total_tokens": len(self.prompt) + self.tokens}

    # --- response objects ------------------------------------------------------------------------
    def _head(self, kind: str) -> dict:
        prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
        return {"id": f"{prefix}-{self.id}", "object": kind, "created": int(time.time()), "model": self.served.name}

    def completion(self, text: str, finish: str) -> dict:
        return {**self._head("text_completion"), "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": self.usage()}

    def completion_chunk(self, text: str, finish: str | None) -> dict:
        return {**self._head("text_completion"), "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def chat(self, text: str, finish: str) -> dict:
        return {**self._head("chat.completion"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": finish}], "usage": self.usage()}

    def chat_chunk(self, delta: dict, finish: str | None) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def usage_chunk(self, kind: str) -> dict:
        return {**self._head(kind), "choices": [], "usage": self.usage()}
