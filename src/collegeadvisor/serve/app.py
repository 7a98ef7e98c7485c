"""The FastAPI app: OpenAI-compatible chat completions (batched, or streamed as server-sent events), the model
list, a health check and the web chat page.

Model work is scheduled by `batcher.Batcher` (one worker thread, requests that arrive together batched); the
routes' logic is plain functions of `Served`, the state create_app builds. Prompts render through chat_format only.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from collegeadvisor import advise
from collegeadvisor.chat_format import encode_prompt, with_context
from collegeadvisor.errors import TemplateError
from collegeadvisor.generate import answer, cut_at_stop, stream_batch
from collegeadvisor.kb import Retriever
from collegeadvisor.serve import guard
from collegeadvisor.serve.batcher import Batcher, BatchKey
from collegeadvisor.serve.guard import error_body
from collegeadvisor.serve.schema import CHARS_PER_TOKEN_BOUND, ChatRequest

SNIPPET_CHARS = 240
UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|\[")


# ------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()  # a validator's own message (a lone surrogate...) says more than a union's type mismatch
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    loc = []
    for part in first.get("loc", ())[1:]:  # after "body"
        if UNION_TAG.search(str(part)):  # pydantic names the union member it tried: content.str
            break
        loc.append(str(part))
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    return (f"{param}: {msg}" if param else msg), param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


# ------------------------------------------------------------------------------------------ the app
def source_of(hit: dict) -> dict[str, Any]:
    """What a response says about one retrieved passage."""
    meta = hit.get("metadata") or {}
    doc = " ".join(str(hit.get("document", "")).split())
    return {
        "id": str(hit.get("id", "")),
        "school": meta.get("school") or meta.get("source"),
        "program": meta.get("program"),
        "credential": meta.get("credential"),
        "snippet": doc if len(doc) <= SNIPPET_CHARS else doc[: SNIPPET_CHARS - 1].rstrip() + "…",
    }


def grounded_fields(hits: Sequence[dict], verdict: dict | None) -> dict[str, Any]:
    """What a response adds beside OpenAI's fields: every retrieved row (`sources`) and the check of the answer
    against the rows it cites (`grounding`: status verified | unverified | no_claims, cited rows, problems,
    whether it fell back to the row itself)."""
    sources = [source_of(h) for h in hits]
    if verdict is None:
        return {"sources": sources, "grounding": {"status": "no_rows", "cited": [], "problems": [],
                                                  "fallback": False}}
    cited = [{"index": n, **sources[n - 1]} for n in verdict["cited"] if 1 <= n <= len(sources)]
    return {"sources": sources, "grounding": {"status": verdict["status"], "cited": cited,
                                              "problems": verdict["problems"],
                                              "fallback": bool(verdict.get("fallback"))}
                                 | ({"left_out": verdict["left_out"]} if verdict.get("left_out") else {})}


@dataclass
class Served:
    """What the routes of one app share: the loaded run, its limits and the batcher that runs its model."""

    name: str
    tokenizer: Any
    retriever: Retriever | None
    batcher: Batcher
    context: int  # the model's context in tokens
    max_prompt: int
    default_max_tokens: int
    max_tokens_limit: int
    k: int = 3  # rows a grounded answer reads
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, kind: str, cid: str) -> dict:
        return {"id": cid, "object": kind, "created": int(time.time()), "model": self.name}

    def chunk(self, cid: str, delta: dict, finish: str | None = None, **more) -> str:
        body = {**self.envelope("chat.completion.chunk", cid),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **more}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def usage_chunk(self, cid: str, prompt_tokens: int, completion_tokens: int) -> str:
        body = {**self.envelope("chat.completion.chunk", cid), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}
        return f"data: {json.dumps(body)}\n\n"


class Prepared(NamedTuple):
    messages: list[dict]
    passages: list[str] | None  # None: no retrieval
    prompt: list[int]
    hits: list[dict]
    max_tokens: int
    temperature: float
    plan: advise.Plan | None = None  # what the conversation resolved to and how it is answered


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def prepare(srv: Served, req: ChatRequest) -> Prepared:
    """A request's messages, retrieved rows and prompt ids, within the server's limits (APIError otherwise)."""
    messages = [m.plain() for m in req.messages]
    max_tokens = req.max_completion_tokens or req.max_tokens or srv.default_max_tokens
    if max_tokens > srv.max_tokens_limit:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {srv.max_tokens_limit}",
                       param="max_tokens")
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message must come from the user, not the assistant", param="messages")
    hits: list[dict] = []
    plan, model_messages = None, messages
    if srv.retriever is not None:  # resolve the conversation, find its rows, decide (off the event loop)
        plan = await asyncio.to_thread(advise.plan, messages, srv.retriever, srv.k)
        hits, model_messages = plan.hits, advise.model_messages(plan, messages)
    passages = [h["document"] for h in hits] if srv.retriever is not None else None
    rendered = with_context(model_messages, passages or [])
    chars = sum(len(m["content"]) for m in rendered)
    if chars > srv.max_prompt * CHARS_PER_TOKEN_BOUND:
        raise APIError(400, f"the prompt is {chars:,} characters; this server accepts at most {srv.max_prompt} "
                            "tokens", param="messages", code="context_length_exceeded")
    try:  # rendering and tokenizing off the event loop: a long conversation holds up no other request
        prompt = await asyncio.to_thread(encode_prompt, srv.tokenizer, rendered)
    except TemplateError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    if len(prompt) > srv.max_prompt:
        raise APIError(400, f"the prompt is {len(prompt)} tokens; this server accepts at most {srv.max_prompt}",
                       param="messages", code="context_length_exceeded")
    if len(prompt) + max_tokens > srv.context:
        raise APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceed the "
                            f"model's context of {srv.context} tokens", param="max_tokens",
                       code="context_length_exceeded")
    return Prepared(model_messages, passages, prompt, hits, max_tokens, float(req.temperature or 0.0), plan)


async def chat_completion(srv: Served, req: ChatRequest):
    """POST /v1/chat/completions: streamed as generated when there is nothing to check, otherwise answered through
    the batcher (and a grounded answer streamed once it has passed its check)."""
    p = await prepare(srv, req)
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream and p.passages is None:  # nothing to check: tokens go out as they are generated
        return StreamingResponse(sse_stream(srv, cid, p, req.top_p, req.stop, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    key = BatchKey(stream=False, max_tokens=p.max_tokens, temperature=p.temperature, top_p=req.top_p,
                   stops=tuple(req.stop))
    if p.plan is not None and p.plan.reply is not None:  # decided without the model: said as it is
        result = advise.fixed_result(p.plan)
    else:
        result = await srv.batcher.answer(key, p.messages, p.passages, p.plan.expected or None if p.plan else None)
        result = advise.finish(p.plan, result) if p.plan is not None else result
    extra = grounded_fields(p.hits, result.get("grounding")) if srv.retriever is not None else {}
    if p.plan is not None:
        extra["resolution"] = p.plan.describe()
    finish = "stop" if result["stopped"] else "length"
    if req.stream:
        return StreamingResponse(sse_text(srv, cid, result, len(p.prompt), finish, extra, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return {
        **srv.envelope("chat.completion", cid),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage(len(p.prompt), result["n_tokens"]),
        **extra,
    }


async def sse_text(srv: Served, cid: str, result: dict, prompt_tokens: int, finish: str, extra: dict,
                   include_usage: bool):
    """A finished answer as server-sent events, a word at a time."""
    yield srv.chunk(cid, {"role": "assistant", "content": ""})
    for piece in re.findall(r"\S+\s*", result["text"]):
        yield srv.chunk(cid, {"content": piece})
    yield srv.chunk(cid, {}, finish, **extra)
    if include_usage:
        yield srv.usage_chunk(cid, prompt_tokens, result["n_tokens"])
    yield "data: [DONE]\n\n"


async def sse_stream(srv: Served, cid: str, p: Prepared, top_p: float, stops: Sequence[str], include_usage: bool):
    """Tokens as server-sent events while they are generated (through the batcher's `stream`): the same text as
    the batched path, stripped and cut at the first stop string."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def emit(piece: str) -> None:  # called on the model's thread
        loop.call_soon_threadsafe(pieces.put_nowait, ("piece", piece))

    hold = max((len(s) for s in stops), default=1) - 1  # chars held back: a stop string may be starting
    text, sent, cut = "", 0, None
    key = BatchKey(stream=True, max_tokens=p.max_tokens, temperature=p.temperature, top_p=top_p)
    await srv.batcher.stream(key, p.messages, emit, cancel, pieces)
    try:
        yield srv.chunk(cid, {"role": "assistant", "content": ""})
        while True:
            kind, value = await pieces.get()
            if kind == "error":
                yield f"data: {json.dumps(error_body(f'generation failed: {value}', 'server_error'))}\n\n"
                return
            if kind == "piece":
                text = (text + value) if sent else (text + value).lstrip()
                cut = cut_at_stop(text, stops)
                if cut is not None:
                    cancel.set()
                shown = text[:cut] if cut is not None else text[: max(len(text) - hold, 0)]
                upto = len(shown.rstrip())  # trailing spaces wait: the reply may end there
                if upto > sent:
                    yield srv.chunk(cid, {"content": text[sent:upto]})
                    sent = upto
                continue
            final = (text[:cut] if cut is not None else text).rstrip()
            if len(final) > sent:
                yield srv.chunk(cid, {"content": final[sent:]})
            yield srv.chunk(cid, {}, "stop" if value["stopped"] or cut is not None else "length")
            if include_usage:
                yield srv.usage_chunk(cid, len(p.prompt), value["n_tokens"])
            yield "data: [DONE]\n\n"
            return
    finally:
        cancel.set()  # the client went away: free the model at the next token


def create_app(model, tokenizer, manifest: dict, retriever: Retriever | None = None, api_key: str | None = None, *,
               model_name: str | None = None, default_max_tokens: int = guard.DEFAULTS.max_new_tokens,
               max_tokens_limit: int = guard.DEFAULTS.max_tokens_limit, max_prompt_tokens: int | None = None,
               batch_size: int = guard.DEFAULTS.batch_size, batch_wait_ms: float = 10.0,
               limits: guard.Limits | None = None) -> FastAPI:
    """The OpenAI-compatible app for one loaded run, with every limit it keeps set here: the request limits
    below, and `limits` (body size and time, request heads, connections; default guard.Limits()), which the guard
    in front of the app and its uvicorn server (guard.uvicorn_config, `serving`) both read.

    `retriever` (a `kb.Retriever`, over any `kb.Store`) returns `kb.Hit`s; with one, every answer is grounded on
    the hits for the last user message and lists them as `sources`. A prompt longer than `max_prompt_tokens`,
    or one that with max_tokens overflows the model's context, is refused with code context_length_exceeded.
    The API key, when one is given, is checked by the guard on every route but /health and the page.
    """
    name = model_name or Path(manifest.get("run_dir") or "collegeadvisor").name
    # a transformers model's window, or an engine's context (llamacpp.LlamaCpp.n_ctx)
    context = int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or getattr(model, "n_ctx", 0)
                  or 2048)
    batcher = Batcher(partial(answer, model, tokenizer), partial(stream_batch, model, tokenizer), batch_size,
                      batch_wait_ms)
    srv = Served(name, tokenizer, retriever, batcher, context,
                 max_prompt_tokens if max_prompt_tokens is not None else context - 1,
                 min(default_max_tokens, max_tokens_limit), max_tokens_limit,
                 int((manifest.get("retrieval") or {}).get("k") or 3))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="collegeadvisor", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = {"model": model, "tokenizer": tokenizer, "manifest": manifest, "name": name}
    _install_error_handlers(app)
    guard.install(app, api_key, limits)  # key on every route but /health and the page, body size and time limits

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "rag": retriever is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": srv.created,
                                            "owned_by": "collegeadvisor"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("collegeadvisor.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        return await chat_completion(srv, req)

    return app
