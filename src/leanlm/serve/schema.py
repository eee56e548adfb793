"""Request bodies of the OpenAI API (``openai/openai-openapi``), validated strictly by pydantic.

Only what the server honours is declared; a known field of the wrong type or out of range, or an
unknown field, is a 400 with one sentence (``first_error``). Extensions, as in vLLM: ``top_k`` and
``ignore_eos`` (keep generating past the end-of-text token, for load tests of a fixed length).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1: all tokens (vLLM's extension)
    n: Literal[1] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: one prompt, as text or token ids (a list of one is accepted too)."""

    prompt: Annotated[str, Field(min_length=1)] | TokenIds | Annotated[list[str], Field(min_length=1, max_length=1)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    echo: Literal[False] = False
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # the OpenAI default for completions


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(SamplingFields):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def first_error(error: ValidationError) -> str:
    """One sentence for the first problem pydantic found."""
    detail = error.errors(include_url=False)[0]
    if detail["type"] == "json_invalid":
        return f"The request body is not valid JSON ({detail['ctx'].get('error', 'parse error')})."
    where = ".".join(str(part) for part in detail["loc"] if not _is_union_tag(part)) or "body"
    if detail["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {where}."
    if detail["type"] == "missing":
        return f"Missing required parameter: '{where}'."
    return f"Invalid value for '{where}': {detail['msg'].rstrip('.')}."


def _is_union_tag(part) -> bool:
    """pydantic names union members in error locations (``str``, ``list[int]``...): not a field name."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part.startswith(
        "constrained-") or part.startswith("function-") or part[:1].isupper())
