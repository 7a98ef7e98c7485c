"""What stands between the network and the model: the API key, body limits and timeouts, CORS and uvicorn's
connection limits.

- RequestGuard (ASGI): with an API key set, every route except the health check and the (static) web page needs
  it, unknown routes included, compared in constant time (`key_matches`: the one place a key is read); a body over
  `max_body_bytes` gets 413, a body that stalls gets 408; the body is read (and bounded) before the app sees it.
- guarded_http(): uvicorn's own HTTP protocol plus a deadline for request heads (a client that sends half a
  header and waits is cut off with 408), a cap on their size (431), and a lingering close: a response sent while
  the client is still sending its body (a 413) is followed by reading and discarding the rest, within bounds,
  so that the client reads the response instead of a reset connection.
- CORS is closed unless origins are configured (`serve --cors-origin`).
- error_body(): the OpenAI-shaped error every refusal here and every error of the app answers with.

Limits holds every number above, once: its defaults are ServeConfig's (`collegeadvisor serve`'s settings), and
create_app takes one Limits for the app and its uvicorn server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass

from collegeadvisor.config import ServeConfig

OPEN_ROUTES = {("GET", "/health"), ("HEAD", "/health"), ("GET", "/"), ("HEAD", "/")}
BODY_METHODS = {"POST", "PUT", "PATCH"}


DEFAULTS = ServeConfig()  # `collegeadvisor serve`'s settings by default: the one place their numbers are written
LINGER_IDLE_S = 2.0  # a lingering close ends once the client has sent nothing for this long


@dataclass(frozen=True)
class Limits:
    """What one server allows; set once, when create_app builds the app (and its uvicorn config reads it)."""

    max_body_bytes: int = DEFAULTS.max_body_bytes  # a chat request is a few KB
    body_timeout_s: float = DEFAULTS.request_timeout  # the whole body must arrive within this
    head_timeout_s: float = DEFAULTS.request_timeout  # the request line and headers must arrive within this
    max_head_bytes: int = 64 << 10
    max_connections: int = DEFAULTS.max_connections  # uvicorn's limit_concurrency: past it, 503
    # after a 413 (or any response sent before its request's body was read), the rest of the body is read and
    # discarded, at most this much for at most this long, so that the client can finish sending and read the
    # response: closing while it still sends would reset the connection and lose the response
    linger_bytes: int = 256 << 20
    linger_s: float = 10.0

    @classmethod
    def from_config(cls, s: ServeConfig) -> Limits:
        """The limits `collegeadvisor serve` runs with."""
        return cls(max_body_bytes=s.max_body_bytes, body_timeout_s=s.request_timeout,
                   head_timeout_s=s.request_timeout, max_connections=s.max_connections)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """The body of every error response, OpenAI's shape: {"error": {message, type, param, code}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_bytes(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps(error_body(message, type_, code=code)).encode()


def key_matches(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """Authorization: Bearer KEY (or x-api-key: KEY), compared in constant time."""
    given = b""
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            given = value[7:]
            break
        if name == b"x-api-key":
            given = value
    return hmac.compare_digest(given, api_key.encode("utf-8"))


class RequestGuard:
    """Pure ASGI middleware (no buffering of responses, so streams pass straight through)."""

    def __init__(self, app, api_key: str | None, limits: Limits):
        self.app, self.api_key, self.limits = app, api_key, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and (scope["method"], scope["path"]) not in OPEN_ROUTES and not key_matches(
                scope["headers"], self.api_key):
            return await self._reply(send, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                     "invalid_api_key", "authentication_error")
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            return await self._too_large(send)
        try:
            body, over = await asyncio.wait_for(self._read_body(receive), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            return await self._reply(send, 408, f"the request body did not arrive within "
                                     f"{self.limits.body_timeout_s:g} s", "request_timeout")
        if body is None:  # the client went away, or the body is over the limit
            return await self._too_large(send) if over else None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _read_body(self, receive) -> tuple[bytes | None, bool]:
        """(body, False); (None, True) past the limit; (None, False) when the client went away."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                return None, True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    async def _too_large(self, send):
        await self._reply(send, 413, f"the request body is over {self.limits.max_body_bytes:,} bytes",
                          "request_too_large")

    @staticmethod
    async def _reply(send, status: int, message: str, code: str, type_: str = "invalid_request_error"):
        body = _error_bytes(message, type_, code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status in (408, 413):
            headers.append((b"connection", b"close"))
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install(app, api_key: str | None, limits: Limits | None = None) -> Limits:
    """Put the guard in front of the app, with these limits (also app.state.limits, which uvicorn_config reads)."""
    limits = limits or Limits()
    app.state.limits = limits
    app.add_middleware(RequestGuard, api_key=api_key, limits=limits)
    return limits


def allow_cors(app, origins: list[str]) -> None:
    """Let browser pages from these origins call the API (preflights answered before the key check). Without a
    call, no cross-origin page can read a response."""
    from starlette.middleware.cors import CORSMiddleware  # the web stack: not loaded until a server starts

    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-api-key"], allow_credentials=False)


# ------------------------------------------------------------------------------------------ uvicorn
class _Transport:
    """A connection's transport as uvicorn's protocol sees it: the same one, but its close() asks the protocol,
    which may linger first (GuardedHTTP.close_transport)."""

    def __init__(self, transport, protocol):
        self.raw, self._protocol = transport, protocol

    def close(self) -> None:
        self._protocol.close_transport()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self.raw.is_closing()

    def __getattr__(self, name):
        return getattr(self.raw, name)


class _HeadAndLinger:
    """The request-head deadline and size cap, and the lingering close, of GuardedHTTP (guarded_http): its state and
    the methods that call nothing of uvicorn's protocol; the overrides that do (through super()) are GuardedHTTP's
    own. GuardedHTTP's bases are (uvicorn's protocol, this), so uvicorn's would win a name clash: none of these
    names is uvicorn's. `guard_limits` is the server's Limits."""

    guard_limits: Limits
    _head_timer = None
    _head_cycle = None
    _head_bytes = 0
    lingering = False
    _linger_timer = None
    _linger_left = 0
    _linger_end = _linger_last = 0.0
    _shutting_down = False

    def close_transport(self) -> None:
        """uvicorn closes the connection: at once, or lingering when a response went out before its request's
        body had all arrived."""
        raw, cycle, limits = self.transport.raw, self.cycle, self.guard_limits
        if (self.lingering or self._shutting_down or raw.is_closing() or cycle is None
                or not cycle.response_complete or not cycle.more_body or cycle.disconnected
                or limits.linger_bytes <= 0 or limits.linger_s <= 0):
            raw.close()
            return
        self.lingering = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        now = self.loop.time()
        self._linger_left, self._linger_end, self._linger_last = limits.linger_bytes, now + limits.linger_s, now
        if raw.can_write_eof():
            raw.write_eof()  # after the response: the client sees it end
        raw.resume_reading()
        self._linger_timer = self.loop.call_later(min(LINGER_IDLE_S, limits.linger_s), self._linger_check)

    def _linger_check(self) -> None:
        now = self.loop.time()
        if now >= self._linger_end or now - self._linger_last >= LINGER_IDLE_S:
            self._linger_timer = None
            self.transport.raw.close()
            return
        wake = min(self._linger_last + LINGER_IDLE_S, self._linger_end)
        self._linger_timer = self.loop.call_later(max(wake - now, 0.01), self._linger_check)

    def _arm(self) -> None:
        if self._head_timer is not None and self._head_cycle is self.cycle:
            return  # this head is already being timed
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_cycle, self._head_bytes = self.cycle, 0
        self._head_timer = self.loop.call_later(self.guard_limits.head_timeout_s, self._expired, self.cycle)

    def _expired(self, cycle) -> None:
        self._head_timer = None
        if self.cycle is cycle and (cycle is None or cycle.response_complete):
            self._refuse(408, "Request Timeout", f"the request head did not arrive within "
                                                 f"{self.guard_limits.head_timeout_s:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        if self.transport.is_closing():
            return
        body = _error_bytes(message, "invalid_request_error",
                            "request_timeout" if status == 408 else "request_too_large")
        self.transport.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: "
                             f"{len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        self.transport.close()


def guarded_http(limits: Limits):
    """uvicorn's HTTP protocol (httptools where installed, else h11) with a deadline and a size cap for each
    request head: a client that sends part of a request line or headers and stalls gets 408 and is closed,
    one that sends more than max_head_bytes of headers gets 431. A connection closed after a response but while
    its request's body is still arriving (the guard's 413) closes lingering: the response goes out with the end
    of the stream, the rest of the body is read and thrown away until the client stops (it has read the response
    and closed, or sent nothing for LINGER_IDLE_S), or linger_bytes or linger_s run out, and only then is the
    connection closed. Closed at once instead, the kernel would reset the connection while the client still sends,
    and the client would never read the response."""
    try:  # uvicorn and httptools (optional): not loaded until a server starts
        import httptools  # noqa: F401

        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class GuardedHTTP(Base, _HeadAndLinger):
        guard_limits = limits

        def connection_made(self, transport):
            super().connection_made(_Transport(transport, self))
            self._arm()

        def connection_lost(self, exc):
            for timer in (self._head_timer, self._linger_timer):
                if timer is not None:
                    timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.lingering:  # the rest of a refused body: counted and dropped
                self._linger_left -= len(data)
                self._linger_last = self.loop.time()
                if self._linger_left <= 0:
                    self.transport.raw.close()
                return
            if self.cycle is None or self.cycle.response_complete:  # these bytes belong to a request head
                self._arm()
                end = data.find(b"\r\n\r\n")
                self._head_bytes += len(data) if end < 0 else end
                if self._head_bytes > limits.max_head_bytes:
                    return self._refuse(431, "Request Header Fields Too Large",
                                        f"the request head is over {limits.max_head_bytes:,} bytes")
            super().data_received(data)

        def shutdown(self) -> None:
            self._shutting_down = True  # the server stops: nothing lingers
            super().shutdown()

    return GuardedHTTP


def uvicorn_config(app, log_level: str = "info", limits: Limits | None = None):
    import uvicorn  # not loaded until a server starts

    limits = limits or getattr(app.state, "limits", None) or Limits()
    return uvicorn.Config(app, log_level=log_level, http=guarded_http(limits), timeout_keep_alive=5,
                          limit_concurrency=limits.max_connections, h11_max_incomplete_event_size=limits.max_head_bytes,
                          server_header=False)
