"""`collegeadvisor chat`: an interactive terminal chat with multi-turn history, streaming, /reset and /exit.
Reads piped stdin too (one question per line). Renders through chat_format from the run's manifest."""

from __future__ import annotations

import sys
from typing import Callable, Sequence, TextIO

from collegeadvisor.chat_format import with_context
from collegeadvisor.generate import stream

HELP = "commands: /reset (forget the conversation), /exit"


def chat_loop(model, tokenizer, inp: TextIO = sys.stdin, out: TextIO = sys.stdout, max_new_tokens: int = 256,
              temperature: float = 0.0, retriever: Callable[[str], Sequence[str]] | None = None) -> int:
    """Answer each line of `inp`; returns the number of answers given."""
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
        convo = with_context(history, retriever(text)) if retriever else history
        print("advisor> ", end="", file=out, flush=True)
        pieces = []
        for piece in stream(model, tokenizer, convo, max_new_tokens=max_new_tokens, temperature=temperature):
            pieces.append(piece)
            print(piece, end="", file=out, flush=True)
        reply = "".join(pieces).strip()
        if not reply:
            print("(no answer: the model produced an empty reply)", end="", file=out)
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": reply})
        answered += 1
    return answered
