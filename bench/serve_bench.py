"""Serving benchmark: requests/s and p50/p95 latency at 1, 4 and 16 concurrent clients against a real uvicorn
server on loopback, for batched (non-streaming) and streaming requests. Bounded: a fixed number of requests per
level, then it stops. Prints a table and writes the `## Serving` section of BENCHMARKS.md.

    python bench/serve_bench.py --run latest --requests 16 --max-tokens 32

With `--engine` (torch | llamacpp) and `--rag`, the questions are the run's held-out ones, answered from the full
knowledge base as served (k = 3), and `--baseline` adds bare llama.cpp: llama-cpp-python's own server on the same
GGUF, sent the same rendered prompts (what our server would prompt its engine with) at the same concurrency and
token budget, nothing of ours in the way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import httpx

from collegeadvisor.fsutil import atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
from _bench import cpu_name  # noqa: E402
from collegeadvisor.data.heldout import default_questions, load_questions
from collegeadvisor.runs import find_run, load_run, run_retriever, run_tokenizer
from collegeadvisor.serve import serving
from collegeadvisor.serve.app import create_app

QUESTIONS = [
    "What do graduates of the Bachelor's Degree in Registered Nursing at Ohio State University earn?",
    "Is an Associate's Degree in Business Administration at Miami Dade College worth it?",
    "What is the median debt for a Master's Degree in Social Work at the University of Michigan?",
    "Does a certificate in Cosmetology pay more than a high-school diploma in Texas?",
]
SECTION = "## Serving"
WARMUP = 6  # requests before measuring


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def one_request(http: httpx.Client, i: int, max_tokens: int, stream: bool, prompts: list[str] | None = None) -> dict:
    body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "max_tokens": max_tokens,
            "stream": stream}
    t0 = time.perf_counter()
    if prompts is not None:  # bare llama.cpp: the rendered prompt, as our server would send its engine
        r = http.post("/v1/completions", json={"prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                                               "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                                               "repeat_penalty": 1.0, "stream": False})
        r.raise_for_status()
        return {"latency": time.perf_counter() - t0, "tokens": r.json()["usage"]["completion_tokens"], "ttft": None}
    if not stream:
        r = http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return {"latency": time.perf_counter() - t0, "tokens": r.json()["usage"]["completion_tokens"], "ttft": None}
    first, tokens = None, 0
    body["stream_options"] = {"include_usage": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "tokens": tokens, "ttft": first}


def level(url: str, clients: int, n_requests: int, max_tokens: int, stream: bool,
          prompts: list[str] | None = None, label: str | None = None) -> dict:
    """`clients` threads share `n_requests` requests; each thread sends its next one when the last returns."""
    results: list[dict] = []
    errors: list[str] = []
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                try:
                    results.append(one_request(http, i, max_tokens, stream, prompts))
                except httpx.HTTPError as exc:
                    errors.append(str(exc))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    return {"mode": label or ("stream" if stream else "batched"), "clients": clients, "requests": len(results),
            "errors": len(errors), "req_s": len(results) / wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "p50_ms": 1000 * statistics.median(lat), "p95_ms": 1000 * percentile(lat, 0.95),
            "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else None}


@contextmanager
def server_process(argv: list[str], probe: str) -> Iterator[str]:
    """A server started as its own process (as users start it) on a free loopback port: its URL until the block
    ends. `argv` gets `--host 127.0.0.1 --port PORT`; `probe` is a path that answers 200 once it is ready."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(argv + ["--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(480):
            if server.poll() is not None:
                raise SystemExit(f"serve_bench: the server exited ({server.returncode}): {' '.join(argv)}")
            try:
                if httpx.get(f"{url}{probe}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def bare_llamacpp(run, manifest, tok, retrieve, args) -> list[dict]:
    """The same questions' prompts (as `advise` renders them for the engine) sent to llama-cpp-python's own server
    on the run's GGUF, at the same concurrency levels and token budget."""
    from collegeadvisor import advise
    from collegeadvisor.chat_format import render_text, with_context
    from collegeadvisor.llamacpp import gguf_for_run

    prompts = []
    for q in QUESTIONS:
        conv = [{"role": "user", "content": q}]
        plan = advise.plan(conv, retrieve)
        if plan.reply is None:
            prompts.append(render_text(tok, with_context(advise.model_messages(plan, conv), plan.passages),
                                       add_generation_prompt=True))
    # where llama.cpp's AMX matmul would crash (a stock build on the developers' Xeons), the server loads as our
    # engine does, without extra buffer types (llamacpp.amx_runs); nothing else of ours runs in it
    gguf = gguf_for_run(run, manifest)
    launch = ("import sys, runpy, llama_cpp.llama_cpp as L\n"
              "from collegeadvisor.llamacpp import amx_runs, _without_extra_bufts\n"
              "d = L.llama_model_default_params\n"
              f"if not amx_runs({str(gguf)!r}, {args.threads}): "
              "L.llama_model_default_params = lambda: _without_extra_bufts(d())\n"
              "sys.argv = ['llama_cpp.server'] + sys.argv[1:]\n"
              "runpy.run_module('llama_cpp.server', run_name='__main__')\n")
    rows = []
    with server_process([sys.executable, "-c", launch, "--model", str(gguf), "--n_ctx", "4096",
                         "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)],
                        "/v1/models") as url:
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(WARMUP):
                one_request(http, i, args.max_tokens, False, prompts)
        for clients in (int(c) for c in args.levels.split(",")):
            rows.append(level(url, clients, args.requests, args.max_tokens, False, prompts, "bare llama.cpp"))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| mode | clients | requests | req/s | completion tok/s | p50 latency ms | p95 latency ms "
             "| p50 first token ms |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ttft = f"{r['ttft_p50_ms']:.0f}" if r["ttft_p50_ms"] is not None else "-"
        lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {ttft} |")
    return "\n".join(lines)


def write_section(path: Path, body: str, title: str = SECTION) -> None:
    """Replace (or append) only this benchmark's section; other sections belong to other benchmarks."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    section = f"{title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    atomic_write_text(path, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="latest")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    p.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--modes", default="batched,stream")
    p.add_argument("--out", default="BENCHMARKS.md", help="file whose '## Serving' section is rewritten ('' to skip)")
    p.add_argument("--engine", default=None, choices=("torch", "llamacpp"),
                   help="answer as `serve --engine` does (with --rag: held-out questions, grounded)")
    p.add_argument("--rag", action="store_true", help="retrieve from the full knowledge base, as served")
    p.add_argument("--baseline", action="store_true", help="also bare llama.cpp (its own server, same prompts)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    run = find_run(args.run, args.output_dir)
    if args.engine is None:  # the torch model in this process, served by the app on a thread
        model, tok, manifest = load_run(run, device="cpu")
        retrieve = None
        server = serving(create_app(model, tok, manifest, retriever=retrieve, batch_size=args.batch_size))
    else:  # `collegeadvisor serve --engine ...` in its own process, as users start it (and as bare llama.cpp runs)
        tok, manifest, _ = run_tokenizer(run)
        retrieve = run_retriever(run, rag=True) if args.rag else None
        cli = Path(sys.executable).with_name("collegeadvisor")
        server = server_process([str(cli), "serve", "--run", str(run), "--engine", args.engine, "--threads",
                                 str(args.threads), "--batch-size", str(args.batch_size),
                                 "--rag" if args.rag else "--no-rag"], "/health")
    if retrieve is not None:  # the held-out questions, as users ask them of the served run
        QUESTIONS[:] = [q["question"] for q in load_questions(default_questions(manifest), args.requests)]
    rows = []
    with server as url:
        with httpx.Client(base_url=url, timeout=600) as http:  # warm-up: the first generate calls run slow
            for i in range(WARMUP):
                one_request(http, i, args.max_tokens, stream=i % 2 == 1)
        for mode in args.modes.split(","):
            for clients in (int(c) for c in args.levels.split(",")):
                rows.append(level(url, clients, args.requests, args.max_tokens, mode == "stream",
                                  label=f"{args.engine or 'torch'} {'stream' if mode == 'stream' else 'batched'}"))
                print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    if args.baseline:
        rows += bare_llamacpp(run, manifest, tok, retrieve, args)
    print(table(rows))
    if args.out:
        import torch

        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        body = (
            f"`python bench/serve_bench.py --run {args.run} --requests {args.requests} --levels {args.levels} "
            f"--max-tokens {args.max_tokens}"
            + (f" --engine {args.engine}" if args.engine else "") + (" --rag" if args.rag else "")
            + (" --baseline" if args.baseline else "") + f"` ({when}), on {cpu_name()}. "
            + (f"Engine `{args.engine}`; questions: the run's held-out ones, answered from the full knowledge base "
               "as served (resolution, the asked rows, constraint, check). `bare llama.cpp`: llama-cpp-python's own "
               "server on the same GGUF, sent the same rendered prompts (non-streaming), nothing of ours. "
               if args.rag else "")
            + f"Run `{run.name}` on base model `{manifest['base_model']['spec']}`, "
            + (f"served by `collegeadvisor serve --engine {args.engine} --threads {args.threads}` in its own process "
               f"(uvicorn, loopback, greedy; the bench's clients in another process)" if args.engine else
               f"served by `collegeadvisor serve`'s app (uvicorn, loopback, CPU, fp32, greedy, batch size "
               f"{args.batch_size}; torch {torch.__version__} with {torch.get_num_threads()} threads)")
            + f"; {platform.machine()}, {os.cpu_count()} cores. After {WARMUP} warm-up requests, "
            f"each level sends {args.requests} requests from the given number of concurrent clients, each client "
            "sending its next request when the last one returns. `batched`: non-streaming requests, grouped by "
            "the server into one `generate` call (an engine of its own answers them one after another); `stream`: "
            "server-sent events (a grounded answer is sent once it has passed its check).\n\n"
            f"{table(rows)}\n\n"
            "Compare levels and servers within one run, not across runs."
        )
        title = SECTION if args.engine is None else f"{SECTION}: grounded, by engine"
        write_section(Path(args.out), body, title)
        print(f"wrote the '{title}' section of {args.out}", file=sys.stderr)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
