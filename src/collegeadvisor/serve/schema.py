"""The request schema of the OpenAI-compatible API, with its limits: what a request may hold before any of it is
rendered or reaches the model (the subset of OpenAI's chat completion request this server honours)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Request limits: rendering a conversation costs time in the number of turns times its length (chat_format renders
# each assistant turn's prefix), so turns are bounded here and the total length against the prompt limit in
# _prepare, before any rendering; the body as a whole is bounded by guard.Limits.max_body_bytes.
MAX_MESSAGES = 256
MAX_TEXT_PARTS = 64
MAX_STOPS, MAX_STOP_CHARS = 4, 64
MAX_MODEL_CHARS = 256
CHARS_PER_TOKEN_BOUND = 32  # no real prompt averages more characters per token: longer ones are refused unrendered
SURROGATE = re.compile(r"[\ud800-\udfff]")


def _text_only(value: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"), which are not text and break the tokenizer: a 400."""
    found = SURROGATE.search(value)
    if found:
        raise ValueError(f"holds a lone UTF-16 surrogate (U+{ord(found.group()):04X}) at character {found.start() + 1}")
    return value


# ------------------------------------------------------------------------------------------ request schema
class TextPart(BaseModel):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, v: str) -> str:
        return _text_only(v)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, str):
            return _text_only(v)
        if len(v) > MAX_TEXT_PARTS:
            raise ValueError(f"takes at most {MAX_TEXT_PARTS} text parts")
        return v

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request this server honours; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)  # echoed nowhere, never a path: one run is served
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return [_text_only(s) for s in stops]
