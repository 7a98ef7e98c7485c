"""The server under load and attack, measured against a running `collegeadvisor serve` (started here as a real
subprocess, with an API key), by 32 concurrent clients:

- load:     hundreds of chat completions, streaming and not: status counts (no 5xx), p50/p95 latency;
- auth:     every route, method and path variant, with no key, wrong keys and near-miss headers: no bypass;
- hang-ups: streams dropped after their first chunk free their place (the next requests are served promptly);
- stalls:   connections that send half a request head or half a body and wait are cut off (408) while others
            are served;
- limits:   huge bodies (413), too many turns, a 10,000-turn conversation, max_tokens, stop lists, lone
            surrogates (400), a `model` naming a file (ignored);
- memory:   the server's RSS before, after, and after a second identical round (it must level off).

    python bench/serve_load.py --run runs/my-run --requests 240
    python bench/serve_load.py            # trains the tiny test model first (seconds)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kill_resume  # noqa: E402

KEY = "k-" + os.urandom(12).hex()
CLIENTS = 32
QUESTIONS = ["What do graduates of program 3 earn at school 3?", "Is program 5 at school 5 worth it?",
             "What is the median debt for program 9 at school 2?", "Does a certificate in welding pay?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`collegeadvisor serve` in a subprocess."""

    def __init__(self, run: Path, work: Path, timeout_s: float, max_tokens_limit: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "serve.log"
        cmd = kill_resume.cli("serve", "--run", run, "--port", self.port, "--api-key", KEY, "--log-level", "warning",
                              "--request-timeout", timeout_s, "--max-tokens-limit", max_tokens_limit)
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     env=kill_resume.child_env(), cwd=work)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError("serve did not start")

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return self.log.read_text(errors="replace")


# ------------------------------------------------------------------------------------------ load
async def one_chat(http: httpx.AsyncClient, i: int, stream: bool, max_tokens: int) -> tuple[int, float]:
    body = {"model": "advisor", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": max_tokens, "stream": stream}
    t0 = time.perf_counter()
    if not stream:
        r = await http.post("/v1/chat/completions", json=body)
        return r.status_code, time.perf_counter() - t0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        done = False
        async for line in r.aiter_lines():
            done = done or line == "data: [DONE]"
            if line.startswith("data: {") and '"server_error"' in line:
                return 599, time.perf_counter() - t0  # an error reported inside the stream counts as a 5xx
        status = r.status_code if (done or r.status_code != 200) else 598  # a stream cut short
    return status, time.perf_counter() - t0


async def gather_limited(coros, limit: int = CLIENTS):
    sem = asyncio.Semaphore(limit)

    async def run(c):
        async with sem:
            return await c
    return await asyncio.gather(*(run(c) for c in coros))


async def load_round(url: str, n: int, max_tokens: int) -> dict:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300,
                                 limits=httpx.Limits(max_connections=CLIENTS)) as http:
        results = await gather_limited([one_chat(http, i, i % 2 == 1, max_tokens) for i in range(n)])
    lat = [t for s, t in results if s == 200]
    codes: dict[str, int] = {}
    for s, _ in results:
        codes[str(s)] = codes.get(str(s), 0) + 1
    return {"requests": n, "status": codes, "5xx": sum(1 for s, _ in results if s >= 500),
            "p50_s": round(percentile(lat, 0.5), 3), "p95_s": round(percentile(lat, 0.95), 3)}


# ------------------------------------------------------------------------------------------ auth
ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/chat/completions"),
          ("POST", "/v1/completions"), ("GET", "/v1/nothing"), ("GET", "/openapi.json"), ("GET", "/docs"),
          ("OPTIONS", "/v1/chat/completions"), ("HEAD", "/v1/models"), ("GET", "/v1/models/"), ("GET", "//v1/models"),
          ("GET", "/V1/MODELS"), ("GET", "/v1/models?api_key=KEY"), ("GET", "/v1/%6dodels"), ("GET", "/health/../v1/models"),
          ("POST", "/health"), ("PUT", "/v1/chat/completions"), ("DELETE", "/v1/models")]


def bad_headers() -> list[list[tuple[bytes, bytes]]]:
    """Wrong keys only. Never the right key padded with spaces or tabs: HTTP parsers strip whitespace around a
    header value (RFC 9110 section 5.5), so the app receives the right key and a 200 is no bypass."""
    k = KEY.encode()
    changed = k[:5] + bytes([k[5] ^ 1]) + k[6:]  # one character changed (XOR 1: always a different printable one)
    return [[], [(b"Authorization", b"Bearer wrong")], [(b"Authorization", b"Bearer ")],
            [(b"Authorization", b"Basic " + k)], [(b"Authorization", b"Bearer " + changed)],
            [(b"Authorization", b"Bearer " + k + b"0")], [(b"Authorization", b"Bearer " + k[:4] + b" " + k[4:])],
            [(b"Authorization", b"Bearer " + k.upper())],
            [(b"Authorization", b"Bearer " + k[:-1])], [(b"authorization", b"bearer " + k[:-1] + b"x")],
            [(b"x-api-key", b"wrong")], [(b"Authorization", b"Bearer" + k)],
            [(b"Authorization", b"Bearer " + k + "\u00e9".encode())], [(b"x-api-key", k.upper())],
            [(b"Cookie", b"key=" + k)], [(b"Authorization", b"Token " + k)],
            [(b"Authorization", b"Bearer wrong"), (b"x-api-key", k + b"x")], [(b"Authorization", b"Bearer \x00" + k)]]


async def raw_request(url: str, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> int:
    """One request written byte for byte (paths and header values no client library would send); its status."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: " + host.encode(), b"Connection: close",
            b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode()]
    writer.write(b"\r\n".join(head + [n + b": " + v for n, v in headers]) + b"\r\n\r\n" + body)
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 120)
    writer.close()
    return int(line.split()[1]) if line.startswith(b"HTTP/") else 0


async def auth_probe(url: str) -> dict:
    """Every route and path variant x every wrong or near-miss credential, 32 at a time: any answer below 400 is
    a bypass. The right key must work."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()

    async def probe(method, path, headers):
        return method, path, await raw_request(url, method, path.replace("KEY", KEY), headers,
                                               body if method in ("POST", "PUT") else b"")

    results = await gather_limited([probe(m, p, h) for m, p in ROUTES for h in bad_headers()])
    k = KEY.encode()
    good = [await raw_request(url, "GET", "/v1/models", [(b"Authorization", b"Bearer " + k)]),
            await raw_request(url, "POST", "/v1/chat/completions", [(b"x-api-key", k)], body),
            await raw_request(url, "GET", "/health", [])]
    bypass = [r for r in results if r[2] < 400]
    return {"requests": len(results), "bypasses": len(bypass), "examples": bypass[:3],
            "5xx": sum(1 for r in results if r[2] >= 500), "right_key": good, "ok": not bypass and good == [200] * 3}


# ------------------------------------------------------------------------------------------ hang-ups, stalls
async def hangups(url: str, n: int, max_tokens: int) -> dict:
    """n streams, each dropped after its first content chunk; then a normal round must be served promptly."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": max_tokens, "stream": True}

    async def drop(http):
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if '"content"' in line:
                    break  # leaving the block closes the connection mid-stream
        return r.status_code

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
        t0 = time.perf_counter()  # one stream run to the end: what each dropped one would have cost
        full = (await http.post("/v1/chat/completions", json={**body, "stream": False})).json()["usage"]
        full_s = time.perf_counter() - t0
        dropped = await asyncio.gather(*(drop(http) for _ in range(n)))
    t0 = time.perf_counter()
    after = await load_round(url, 8, 16)
    return {"dropped": n, "dropped_status": sorted(set(dropped)), "one_full_reply": {
        "tokens": full["completion_tokens"], "s": round(full_s, 2)}, "then_8_requests_s": round(time.perf_counter() - t0, 2),
        "then_5xx": after["5xx"], "ok": after["5xx"] == 0 and set(dropped) == {200}}


def stall(url: str, part: bytes) -> socket.socket:
    host, port = url.rsplit(":", 1)
    s = socket.create_connection((host.split("//")[1], int(port)), timeout=60)
    s.sendall(part)
    return s


def stalls(url: str, n: int, timeout_s: float) -> dict:
    """n connections each send half a head or half a body and wait; others are served meanwhile; the server
    answers each stalled one with 408 and closes it within the timeout (plus slack)."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Ty"
    body = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"messages\": [")
    socks = [stall(url, head if i % 2 == 0 else body) for i in range(n)]
    t0 = time.perf_counter()
    served = asyncio.run(load_round(url, 8, 8))
    served_s = time.perf_counter() - t0
    answers = []
    for s in socks:
        s.settimeout(timeout_s + 15)
        try:
            data = s.recv(4096)
        except OSError:
            data = b"(no answer)"
        answers.append(data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed")
        s.close()
    closed_by = time.perf_counter() - t0
    return {"stalled": n, "others_served": served["status"], "others_s": round(served_s, 2),
            "stalled_answers": sorted(set(answers)), "all_cut_off_after_s": round(closed_by, 1),
            "ok": served["5xx"] == 0 and served["status"].get("200") == 8 and all("408" in a for a in answers)}


# ------------------------------------------------------------------------------------------ limits
def limit_probes(url: str) -> dict:
    h = {"Authorization": f"Bearer {KEY}"}
    ask = [{"role": "user", "content": "hi"}]
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(10_001)]
    cases = {
        "2 MiB body": ({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413),
        "10,000-turn conversation": ({"messages": turns}, 400),
        "257 messages": ({"messages": turns[:257]}, 400),
        "max_tokens over the limit": ({"messages": ask, "max_tokens": 10**6}, 400),
        "5 stop strings": ({"messages": ask, "stop": list("abcde")}, 400),
        "a 65-character stop string": ({"messages": ask, "stop": "s" * 65}, 400),
        "a lone surrogate": ('{"messages": [{"role": "user", "content": "a\\ud800b"}]}', 400),
        "a prompt far past the context": ({"messages": [{"role": "user", "content": "word " * 180_000}]}, 400),
        "a model naming a file": ({"messages": ask, "model": "../../../../etc/passwd", "max_tokens": 2}, 200),
    }
    out, ok = {}, True
    with httpx.Client(base_url=url, headers=h, timeout=120) as http:
        for name, (body, want) in cases.items():
            t0 = time.perf_counter()
            r = (http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
                 if isinstance(body, str) else http.post("/v1/chat/completions", json=body))
            good = r.status_code == want and (want != 200 or r.json()["model"] != body["model"])
            out[name] = {"status": r.status_code, "want": want, "s": round(time.perf_counter() - t0, 3)}
            ok = ok and good
    return {"cases": out, "ok": ok}


def run(run_dir: Path | None, work: Path, requests: int = 240, max_tokens: int = 32, timeout_s: float = 3.0,
        log=print) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    run_dir = run_dir or kill_resume.train_reference(work, 30)
    server = Server(run_dir, work, timeout_s, max_tokens_limit=256)
    try:
        rss = {"start_mb": round(server.rss_mb())}
        asyncio.run(load_round(server.url, 16, max_tokens))  # warm-up
        rss["warm_mb"] = round(server.rss_mb())
        result = {"load": asyncio.run(load_round(server.url, requests, max_tokens))}
        log(f"  load: {result['load']}")
        result["auth"] = asyncio.run(auth_probe(server.url))
        log(f"  auth: {result['auth']}")
        result["hangups"] = asyncio.run(hangups(server.url, 16, 256))
        log(f"  hang-ups: {result['hangups']}")
        result["stalls"] = stalls(server.url, 20, timeout_s)
        log(f"  stalls: {result['stalls']}")
        result["limits"] = limit_probes(server.url)
        log(f"  limits: {result['limits']}")
        rss["after_mb"] = round(server.rss_mb())
        result["load_again"] = asyncio.run(load_round(server.url, requests, max_tokens))
        rss["after_second_round_mb"] = round(server.rss_mb())
        log(f"  second round: {result['load_again']}, rss {rss}")
    finally:
        server_log = server.stop()
    rss["second_round_growth_mb"] = rss["after_second_round_mb"] - rss["after_mb"]
    result["rss"] = rss
    result["tracebacks_in_log"] = server_log.count("Traceback")
    total = [result["load"], result["load_again"]]
    result["served"] = sum(r["requests"] for r in total) + result["auth"]["requests"] + 16 + 16 + 20 + 9
    result["5xx"] = sum(r["5xx"] for r in total) + result["auth"]["5xx"] + result["hangups"]["then_5xx"]
    result["ok"] = (result["5xx"] == 0 and result["auth"]["ok"] and result["hangups"]["ok"] and result["stalls"]["ok"]
                    and result["limits"]["ok"] and rss["second_round_growth_mb"] < 50
                    and result["tracebacks_in_log"] == 0)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a run directory [default: train the tiny test model]")
    ap.add_argument("--work", default=None)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="collegeadvisor-serve-load-"))
    result = run(Path(args.run) if args.run else None, work, args.requests, args.max_tokens)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
