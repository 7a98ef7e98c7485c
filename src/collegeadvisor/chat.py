"""`collegeadvisor chat`: an interactive terminal chat with multi-turn history, streaming, /reset and /exit.
Reads piped stdin too (one question per line). Renders through chat_format from the run's manifest."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from collegeadvisor.advise import respond
from collegeadvisor.config import MAX_NEW_TOKENS
from collegeadvisor.generate import stream_batch
from collegeadvisor.kb import Retriever

HELP = "commands: /reset (forget the conversation), /exit"


def _stream_reply(model, tokenizer, history: list[dict], out: TextIO, max_new_tokens: int, temperature: float) -> str:
    def emit(piece: str) -> None:
        print(piece, end="", file=out, flush=True)

    result = stream_batch(model, tokenizer, [history], max_new_tokens, temperature, 1.0, [threading.Event()], [emit])
    return result[0]["text"].strip()


def _resolved(described: dict) -> str:
    """One line on what the conversation resolved to, or what is missing or ambiguous."""
    parts = [s["candidates"][0]["name"] if len(s["candidates"]) == 1 else f"{s['text']}?"
             for s in described["schools"]]
    parts += [p[0] for p in described["programs"][:2]] + [f"field {described['field']}"]
    why = f"; {described['why']}" if described["why"] else ""
    return f"resolved: {', '.join(parts)} ({described['decision']}{why})"


def _grounded_reply(model, tokenizer, history: list[dict], retriever: Retriever, out: TextIO,
                    max_new_tokens: int, temperature: float) -> str:
    """The answer to what the conversation resolved to, checked (and retried) before it is shown, then the rows it
    cites."""
    plan, result = respond(model, tokenizer, [history], retriever, max_new_tokens=max_new_tokens,
                           temperature=temperature)[0]
    reply, verdict, hits = result["text"], result["grounding"], plan.hits
    passages = plan.passages
    print(reply, end="", file=out)
    print(f"\n   ({_resolved(plan.describe())})", end="", file=out)
    note = {"verified": "checked: the asked row, and every figure matches it", "no_claims": "no figures to check",
            "unverified": "NOT verified",
            "unresolved": "figures match the cited rows, but the question resolved to no row"}[verdict["status"]]
    if verdict.get("fallback"):
        note = "the model's answer failed the check; this answer is written from the row itself"
    if verdict.get("fixed"):
        note = "said from the Scorecard table; the model wasn't asked"
    print(f"\n   ({note})", end="", file=out)
    for n in verdict["cited"]:
        if 1 <= n <= len(hits):
            print(f"\n   [{n}] {' '.join(passages[n - 1].split())[:160]}", end="", file=out)
    return reply


def chat_loop(model, tokenizer, inp: TextIO | None = None, out: TextIO | None = None,
              max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0,
              retriever: Retriever | None = None) -> int:
    """Answer each line of `inp`; returns the number of answers given. With a retriever, each answer comes from
    the rows retrieved for its question (checked before it is shown); otherwise replies stream as generated."""
    inp, out = inp or sys.stdin, out or sys.stdout  # the streams of the moment, not of import time
    interactive = inp.isatty()
    history: list[dict] = []
    answered = 0
    if interactive:
        print(f"CollegeAdvisor chat. {HELP}", file=out)
    while True:
        if interactive:
            print("you> ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            print("(conversation reset)", file=out, flush=True)
            continue
        if text.startswith("/"):
            print(HELP, file=out, flush=True)
            continue
        history.append({"role": "user", "content": text})
        print("advisor> ", end="", file=out, flush=True)
        if retriever is not None:
            reply = _grounded_reply(model, tokenizer, history, retriever, out, max_new_tokens, temperature)
        else:
            reply = _stream_reply(model, tokenizer, history, out, max_new_tokens, temperature)
        if not reply:
            print("(no answer: the model produced an empty reply)", end="", file=out)
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": reply})
        answered += 1
    return answered
