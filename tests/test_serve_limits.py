"""The server's limits, set in one place and kept on a real uvicorn server on loopback: a body far over the limit
(64 MB) is answered 413 and the client reads that answer (the server reads and drops the rest of the body before it
closes, instead of resetting the connection while the client still sends), within bounds of bytes and time."""

from __future__ import annotations

import json
import socket
import time

import pytest

from collegeadvisor.config import ServeConfig
from collegeadvisor.serve import guard, serving
from collegeadvisor.serve.app import create_app
from collegeadvisor.serve.batcher import BatchKey

BIG = 64 << 20  # 64 MB
PIECE = b"x" * (1 << 16)


@pytest.fixture(scope="module")
def served(trained_run):
    from collegeadvisor.runs import load_run

    return load_run(trained_run)


def connect(url: str) -> socket.socket:
    host, port = url.split("//")[1].rsplit(":", 1)
    assert host == "127.0.0.1"  # loopback only
    return socket.create_connection((host, int(port)), timeout=10)


def head(length: int | None) -> bytes:
    framing = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"
            ).encode()


def send_body(s: socket.socket, total: int, chunked: bool) -> int:
    """total bytes of body, in 64 KiB pieces (a bounded loop); an error sending is the test's failure."""
    piece = (b"%x\r\n" % len(PIECE)) + PIECE + b"\r\n" if chunked else PIECE
    for _ in range(total // len(PIECE)):
        s.sendall(piece)
    if chunked:
        s.sendall(b"0\r\n\r\n")
    return total


def read_reply(s: socket.socket) -> bytes:
    reply = b""
    while chunk := s.recv(65536):  # to the end of the stream: the server says it is done
        reply += chunk
    return reply


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_64_mb_body_is_read_as_413_before_the_close(served, chunked):
    with serving(create_app(*served)) as url, connect(url) as s:
        t0 = time.monotonic()
        s.sendall(head(None if chunked else BIG))
        send_body(s, BIG, chunked)  # before the lingering close: BrokenPipe / ConnectionReset after ~64 KB
        reply = read_reply(s)
        elapsed = time.monotonic() - t0
    status, _, rest = reply.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 413"), reply[:200]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers.lower()
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert elapsed < 10, elapsed


def test_a_2_mib_body_is_still_413_and_the_server_serves_on(served):
    with serving(create_app(*served)) as url:
        with connect(url) as s:
            s.sendall(head(2 << 20))
            send_body(s, 2 << 20, chunked=False)
            assert read_reply(s).startswith(b"HTTP/1.1 413")
        with connect(url) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            assert read_reply(s).startswith(b"HTTP/1.1 200")


def cut_off_after(s: socket.socket, limit_s: float) -> tuple[int, float]:
    """Keep sending until the server drops the connection (bytes sent, seconds); fails past limit_s."""
    sent, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < limit_s:
            s.sendall(PIECE)
            sent += len(PIECE)
            time.sleep(0.01)
    except OSError:  # reset, or broken pipe: the server closed
        return sent, time.monotonic() - t0
    pytest.fail(f"the server was still reading after {limit_s} s ({sent:,} bytes)")


def test_the_linger_is_bounded_in_time(served):
    limits = guard.Limits(max_body_bytes=4096, linger_s=1.0)
    with serving(create_app(*served, limits=limits)) as url, connect(url) as s:
        s.sendall(head(1 << 30))  # a client that never stops sending
        _, seconds = cut_off_after(s, 8)
    assert 0.5 < seconds < 6, seconds


def test_the_linger_is_bounded_in_bytes(served):
    limits = guard.Limits(max_body_bytes=4096, linger_bytes=1 << 20)
    with serving(create_app(*served, limits=limits)) as url, connect(url) as s:
        s.sendall(head(BIG))
        t0 = time.monotonic()
        with pytest.raises(OSError):  # cut off after about 1 MiB, not 64 MB
            for _ in range(BIG // len(PIECE)):
                s.sendall(PIECE)
                if time.monotonic() - t0 > 8:
                    pytest.fail("the server was still reading after 8 s")


def test_a_client_that_stops_sending_is_closed_when_idle(served):
    with serving(create_app(*served, limits=guard.Limits(max_body_bytes=4096))) as url, connect(url) as s:
        s.sendall(head(BIG) + PIECE)  # far less than it announced, then silence
        assert read_reply(s).startswith(b"HTTP/1.1 413")  # the answer, then the end of the stream
        time.sleep(guard.LINGER_IDLE_S + 1.0)
        with pytest.raises(OSError):  # the server has closed: what is sent now is refused
            for _ in range(64):
                s.sendall(PIECE)
                time.sleep(0.01)


def test_limits_are_set_once_with_serve_defaults():
    assert guard.Limits() == guard.Limits.from_config(ServeConfig())
    s = ServeConfig(max_body_bytes=1234, max_connections=7, request_timeout=2.5)
    assert guard.Limits.from_config(s) == guard.Limits(max_body_bytes=1234, max_connections=7, body_timeout_s=2.5,
                                                       head_timeout_s=2.5)
    with pytest.raises(AttributeError):  # frozen: no change after create_app
        guard.Limits().max_body_bytes = 1


def test_create_app_takes_its_limits(served):
    limits = guard.Limits(max_body_bytes=4096, max_connections=3)
    app = create_app(*served, limits=limits)
    assert app.state.limits is limits
    config = guard.uvicorn_config(app)
    assert config.limit_concurrency == 3


def test_batch_key_fields():
    answered = BatchKey(stream=False, max_tokens=8, temperature=0.0, top_p=1.0, stops=("\n",))
    streamed = BatchKey(stream=True, max_tokens=8, temperature=0.0, top_p=1.0)
    assert answered.stops == ("\n",) and streamed.stops == () and answered != streamed
    assert len({answered, streamed, answered._replace(stops=("\n",))}) == 2  # hashable: groups in the batcher
