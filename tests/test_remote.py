"""`--engine openai`: a real OpenAI-compatible engine (llama-cpp-python's server, started here on a tiny run's GGUF)
answers; the rows' grammar travels with each request, and the check, retries and fallback apply to what comes back.
Runs where the llamacpp extra (with its server) is installed; `.ci/run` installs it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("starlette_context")  # the server's own dependencies (llama-cpp-python[server])

from collegeadvisor.data.scorecard import cited_names  # noqa: E402
from collegeadvisor.errors import AdvisorError  # noqa: E402
from collegeadvisor.generate import answer  # noqa: E402
from collegeadvisor.runs import load_engine  # noqa: E402

DOC = ("Test University (OH, public): Bachelor's Degree in Nursing. Completers: 45. Median earnings four years after "
       "completion: $54,321. High-school graduate earnings in OH: $32,100. Earnings premium: $22,221 (passes the "
       "test). Median debt: $23,456. Debt-to-earnings: 0.43. Payback: 4.5 years.")
QUESTION = [{"role": "user", "content": "What do graduates of the Bachelor's Degree in Nursing at Test University earn?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(gguf_run):
    _, gguf = gguf_run
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("llama_cpp.server did not start within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_the_rows_grammar_shapes_what_the_server_writes(gguf_run, server):
    run, _ = gguf_run
    engine, tok, _ = load_engine(run, "openai", url=server, grammar="llamacpp")
    out = answer(engine, tok, [QUESTION], [[DOC]], max_new_tokens=48, expected=[[1]])[0]
    # the barely trained model writes what the grammar lets it: a citation of the row and the row's own name
    names = cited_names("Bachelor's Degree", "Nursing", "Test University")
    assert any(out["raw"].startswith(f"[1] {name}") for name in names), out["raw"]
    assert out["grounding"]["status"] in ("verified", "no_claims")


def test_without_a_grammar_the_check_alone_holds(gguf_run, server):
    run, _ = gguf_run
    engine, tok, _ = load_engine(run, "openai", url=server, grammar="none")
    out = answer(engine, tok, [QUESTION], [[DOC]], max_new_tokens=24, expected=[[1]])[0]
    assert out["grounding"]["status"] != "unverified"  # whatever came back was checked, retried, or replaced


def test_an_unreachable_server_is_one_line(gguf_run):
    run, _ = gguf_run
    with pytest.raises(AdvisorError, match="no OpenAI-compatible server answers there"):
        load_engine(run, "openai", url=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(Exception, match="needs --engine-url"):
        load_engine(run, "openai")
