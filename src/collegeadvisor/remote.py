"""Any OpenAI-compatible engine (`--engine openai --engine-url URL`): llama.cpp's server, Ollama, vLLM.

Retrieval, rendering and the check stay here: `generate` renders the prompt with chat_format from the run's manifest
and hands it over as text (`/v1/completions`, so the server applies no chat template of its own); the grounding
rules travel as a per-request grammar built from the retrieved rows (`grounding.grammar.gbnf`) where the server takes
one; what comes back goes through `generate.answer`'s check, retries and fallback like any other reply.

`grammar` says how the server takes a grammar: "llamacpp" (llama.cpp's server and llama-cpp-python's: a GBNF string
in `grammar`), "vllm" (structured outputs: `structured_outputs: {"grammar": ...}`, read by xgrammar) or "none"
(Ollama: the check alone).
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Sequence

from collegeadvisor.errors import AdvisorError
from collegeadvisor.grounding.grammar import gbnf

GRAMMAR_FIELDS = ("llamacpp", "vllm", "none")
TIMEOUT_S = 120.0


class RemoteEngine:
    """An OpenAI-compatible server behind `complete`, as `llamacpp.LlamaCpp` is a local llama.cpp context."""

    engine = "openai"

    def __init__(self, url: str, tokenizer, model: str | None = None, grammar: str = "llamacpp",
                 api_key: str | None = None, n_ctx: int = 4096):
        import httpx  # the client: only once a remote engine is used

        if grammar not in GRAMMAR_FIELDS:
            raise AdvisorError(f"--engine-grammar {grammar}: choose one of {', '.join(GRAMMAR_FIELDS)}")
        self.url, self.tokenizer, self.grammar, self.n_ctx = url.rstrip("/"), tokenizer, grammar, n_ctx
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT_S, headers=headers)
        try:
            listed = self.http.get("/v1/models")
            listed.raise_for_status()
            names = [m["id"] for m in listed.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise AdvisorError(f"--engine-url {url}: no OpenAI-compatible server answers there ({exc})") from None
        if model is None and not names:
            raise AdvisorError(f"--engine-url {url}: the server lists no model; name one with --engine-model")
        self.model = model or names[0]
        self.lock = threading.Lock()

    def describe(self) -> str:
        return f"openai ({self.url}, model {self.model}, grammar {self.grammar})"

    def complete(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 constraint: Callable | None = None, stops: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None, cancel: threading.Event | None = None) -> list[int]:
        """The reply's token ids (this tokenizer's, ending with a stop id where the server stopped at end of turn);
        the constraint's rows become the request's grammar."""
        import httpx  # see __init__

        body = {"model": self.model, "prompt": self.tokenizer.decode(list(prompt), skip_special_tokens=False),
                "max_tokens": max_new_tokens, "temperature": float(temperature or 0.0),
                "top_p": float(top_p) if temperature else 1.0, "stream": False}
        rules = getattr(constraint, "rules", [None])[0]
        if rules is not None and self.grammar != "none":
            grammar = gbnf(rules.ctx.passages, rules.expected)
            body |= {"grammar": grammar} if self.grammar == "llamacpp" else {"structured_outputs": {"grammar": grammar}}
        try:
            r = self.http.post("/v1/completions", json=body)
            r.raise_for_status()
            choice = r.json()["choices"][0]
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            raise AdvisorError(f"--engine-url {self.url}: the completion failed ({exc})") from None
        ids = self.tokenizer.encode(choice.get("text") or "", add_special_tokens=False)[:max_new_tokens]
        if choice.get("finish_reason") == "stop" and stops and len(ids) < max_new_tokens:
            ids.append(list(stops)[0])
        for i in ids if on_token is not None else ():
            on_token(i)
        return ids


def api_key_from_env(name: str = "COLLEGEADVISOR_ENGINE_KEY") -> str | None:
    return os.environ.get(name) or None
