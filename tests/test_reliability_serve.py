"""The server under attack, on the tiny trained run: the key on every route but the health check and the page,
body / turn / stop / max_tokens limits (413, 400), lone surrogates (400, never a 500), a `model` that names a file
(ignored), long conversations rendered off the event loop, half-sent requests cut off (408) while others are
served, client hang-ups ending their row's generation, CORS closed unless configured. bench/serve_load.py runs the
long version against `collegeadvisor serve` with 32 clients (make reliability)."""

from __future__ import annotations

import asyncio
import hmac
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from collegeadvisor.serve import guard, serving
from collegeadvisor.serve import app as serve_app
from collegeadvisor.serve.app import create_app
from collegeadvisor.serve.guard import allow_cors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_load

KEY = "s3cret-key"
ASK = [{"role": "user", "content": "What do graduates of program 3 earn at school 3?"}]
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(trained_run):
    from collegeadvisor.runs import load_run

    return load_run(trained_run)


@pytest.fixture
def client(served):
    with TestClient(create_app(*served, api_key=KEY, max_tokens_limit=64)) as c:
        yield c


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing"), ("GET", "/openapi.json"),
    ("GET", "/docs"), ("OPTIONS", "/v1/chat/completions"), ("HEAD", "/v1/models"), ("GET", "/v1/models/"),
    ("POST", "/health"), ("DELETE", "/v1/models"),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"x-api-key": KEY[:-1]}, {"Authorization": f"Bearer{KEY}"}])
def test_every_route_but_health_and_page_needs_the_key(client, method, path, headers):
    r = client.request(method, path, headers=headers, json={"messages": ASK} if method == "POST" else None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert method == "HEAD" or r.json()["error"]["code"] == "invalid_api_key"


def test_every_route_of_the_app_needs_the_key(served):
    """The guard is the only key check (no route has its own): every route the app has, present or added later,
    is refused without the key, but for the health check and the page."""
    app = create_app(*served, api_key=KEY)
    routes = [(m, r.path) for r in app.routes for m in sorted(getattr(r, "methods", None) or ())]
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/v1/models") in routes
    with TestClient(app) as c:
        for method, path in routes:
            r = c.request(method, path, json={"messages": ASK} if method == "POST" else None)
            if (method, path) in guard.OPEN_ROUTES:
                assert r.status_code == 200, (method, path)
            else:
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path)
                assert method == "HEAD" or r.json() == guard.error_body(
                    "missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error",
                    code="invalid_api_key")
                assert c.request(method, path, headers=AUTH, json={"messages": ASK, "max_tokens": 2}
                                 if method == "POST" else None).status_code == 200, (method, path)


def test_the_key_opens_the_api_in_constant_time(client, monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    assert len(calls) >= 2  # every key check went through hmac.compare_digest


@pytest.mark.parametrize("body, status, param", [
    ({"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"t{i}"} for i in range(10_001)]},
     400, "messages"),
    ({"messages": [{"role": "user", "content": "x"}] * 257}, 400, "messages"),
    ({"messages": ASK, "stop": "s" * 65}, 400, "stop"),
    ({"messages": ASK, "max_tokens": 10**9}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 100_000}]}, 400, "messages"),
])
def test_limits_refuse_before_any_rendering(client, monkeypatch, body, status, param):
    monkeypatch.setattr(serve_app, "encode_prompt", lambda *a: pytest.fail("rendered a refused request"))
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert time.perf_counter() - t0 < 2


def test_body_over_the_limit_is_413_with_or_without_a_length(served):
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * 5000 + b'"}]}'
    with TestClient(create_app(*served, api_key=KEY, limits=guard.Limits(max_body_bytes=4096))) as client:
        r = client.post("/v1/chat/completions", content=big, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = client.post("/v1/chat/completions", content=iter([big[:3000], big[3000:]]), headers=AUTH)  # chunked
        assert r.status_code == 413


def test_lone_surrogate_is_a_400_not_a_500(client):
    for text in ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
                 '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
                 '{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud83d"}'):
        r = client.post("/v1/chat/completions", content=text, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text


def test_a_model_field_never_reaches_the_file_system(client, served, monkeypatch):
    import builtins

    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"model": "../../../../etc/passwd", "messages": ASK, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == Path(served[2]["run_dir"]).name
    assert not [f for f in opened if "passwd" in f]
    assert client.post("/v1/chat/completions", headers=AUTH, json={"model": "m" * 257, "messages": ASK}).status_code == 400


def test_cors_is_closed_unless_configured(served):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(create_app(*served)) as c:
        r = c.options("/v1/chat/completions", headers=preflight)
        assert r.status_code >= 400 and "access-control-allow-origin" not in r.headers
        r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}, headers={"Origin": "https://x.org"})
        assert "access-control-allow-origin" not in r.headers
    app = create_app(*served, api_key=KEY)
    allow_cors(app, ["https://ok.example"])
    with TestClient(app) as c:
        ok = c.options("/v1/chat/completions", headers={**preflight, "Origin": "https://ok.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
        bad = c.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in bad.headers
        assert c.post("/v1/chat/completions", json={"messages": ASK}, headers={"Origin": "https://ok.example"}
                      ).status_code == 401  # CORS opens the browser, not the key


def test_a_long_render_holds_up_no_other_request(served, monkeypatch):
    real = serve_app.encode_prompt
    monkeypatch.setattr(serve_app, "encode_prompt", lambda *a: time.sleep(1.5) or real(*a))
    with serving(create_app(*served)) as url, httpx.Client(base_url=url, timeout=30) as http:
        slow = threading.Thread(target=http.post, args=("/v1/chat/completions",),
                                kwargs={"json": {"messages": ASK, "max_tokens": 2}})
        slow.start()
        time.sleep(0.3)
        t0 = time.perf_counter()
        assert http.get("/health").status_code == 200
        assert time.perf_counter() - t0 < 0.5  # the event loop was free while the prompt rendered
        slow.join()


def test_half_sent_requests_are_cut_off_while_others_are_served(served):
    app = create_app(*served, api_key=serve_load.KEY, limits=guard.Limits(head_timeout_s=1.0, body_timeout_s=1.0))
    with serving(app) as url:
        result = serve_load.stalls(url, 6, 1.0)
    assert result["ok"], result
    assert result["others_s"] < 5 and result["all_cut_off_after_s"] < 10


def test_oversized_request_head_is_431(served):
    with serving(create_app(*served)) as url:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * (70 << 10) + b"\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 431")


def test_a_client_hanging_up_mid_stream_ends_its_generation(served, monkeypatch):
    model = served[0]
    lengths = []
    real_generate = model.generate

    def counting(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", counting)
    body = {"messages": ASK, "max_tokens": 600, "stream": True}
    with serving(create_app(*served, max_tokens_limit=600)) as url, httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if '"content"' in line and '""' not in line:
                    break  # hang up after the first piece of text
        deadline = time.monotonic() + 30
        while not lengths and time.monotonic() < deadline:
            time.sleep(0.05)
        full = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert full["usage"]["completion_tokens"] >= 200  # greedy, this prompt runs long (to 600 or its end) ...
    assert lengths and lengths[0] <= 16, lengths  # ... but the row whose client hung up stopped at once


def test_concurrent_clients_with_wrong_keys_get_nothing(served):
    with serving(create_app(*served, api_key=serve_load.KEY)) as url:
        result = asyncio.run(serve_load.auth_probe(url))
    assert result["ok"] and result["bypasses"] == 0 and result["5xx"] == 0 and result["requests"] >= 200, result


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_whitespace_around_the_key_is_stripped_by_the_parser_inside_it_is_refused(served, monkeypatch, parser):
    if parser == "httptools":
        pytest.importorskip("httptools")
    else:
        monkeypatch.setitem(sys.modules, "httptools", None)  # guarded_http falls back to uvicorn's h11 protocol
    assert f"{parser}_impl" in guard.guarded_http(guard.Limits()).__mro__[1].__module__
    k = KEY.encode()
    cases = [
        # RFC 9110 5.5: the parser strips spaces/tabs around a field value, so the app sees the right key: accepted
        ((b"Authorization", b"Bearer " + k + b" "), 200), ((b"Authorization", b"Bearer " + k + b" \t "), 200),
        ((b"Authorization", b"   Bearer " + k), 200), ((b"x-api-key", b"\t" + k + b"  "), 200),
        # whitespace inside the value is kept by the parser and makes a different key: refused
        ((b"Authorization", b"Bearer " + k[:3] + b" " + k[3:]), 401), ((b"Authorization", b"Bearer " + k + b" x"), 401),
        ((b"Authorization", b"Bearer  " + k), 401), ((b"x-api-key", k + b" " + k), 401),
    ]
    with serving(create_app(*served, api_key=KEY)) as url:
        got = [asyncio.run(serve_load.raw_request(url, "GET", "/v1/models", [h])) for h, _ in cases]
    assert got == [status for _, status in cases], list(zip(cases, got))
