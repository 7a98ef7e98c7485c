"""From validated examples to training ids through chat_format, with a never-silent truncation policy; and the
control-token rule `data validate` and `check` both apply: no chat template's control tokens inside the data."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from collegeadvisor.chat_format import IGNORE_INDEX, encode_conversation, with_context
from collegeadvisor.errors import DataError


# The control tokens of the known chat templates (ChatML; Llama/TinyLlama/Zephyr; Mistral/Llama-2 [INST]; Llama-3;
# Gemma) and other formats' scaffolding (Alpaca). Inside message content they are trained as text: the model learns
# to write them, and where one is the model's own it fakes a turn or ends the reply. `data validate` (no tokenizer)
# refuses these; `check` refuses these and the model's own special tokens (control_tokens(tokenizer)).
CONTROL_TOKENS = {
    "<|endoftext|>": "the GPT-2/Qwen/SmolLM end-of-text token",
    "<s>": "the Llama/Mistral beginning-of-sequence token",
    "</s>": "the Llama/Mistral end-of-sequence token",
    "<|im_start|>": "ChatML's turn marker",
    "<|im_end|>": "ChatML's end-of-turn token",
    "<|user|>": "Zephyr/TinyLlama's user marker",
    "<|assistant|>": "Zephyr/TinyLlama's assistant marker",
    "<|system|>": "Zephyr/TinyLlama's system marker",
    "### Instruction:": "Alpaca prompt scaffolding",
    "### Input:": "Alpaca prompt scaffolding",
    "### Response:": "Alpaca prompt scaffolding",
    "[INST]": "Mistral/Llama-2's instruction marker",
    "[/INST]": "Mistral/Llama-2's instruction marker",
    "<|eot_id|>": "Llama-3's end-of-turn token",
    "<|start_header_id|>": "Llama-3's role marker",
    "<start_of_turn>": "Gemma's turn marker",
    "<end_of_turn>": "Gemma's end-of-turn token",
}
SPECIAL_MIN_CHARS = 3  # a tokenizer's special tokens shorter than this are not looked for in the text


def conversation(ex: dict) -> list[dict]:
    """An example's messages, with its retrieved context (if any) placed by chat_format."""
    return with_context(ex["messages"], ex["context"]) if ex.get("context") else ex["messages"]


def special_tokens(tokenizer) -> set[str]:
    """The tokenizer's special tokens, those it adds among them."""
    specials = set(tokenizer.all_special_tokens)
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    specials.update(str(t) for t in added if getattr(t, "special", False))
    return {s for s in specials if s}


def control_tokens(tokenizer=None) -> dict[str, str]:
    """token -> what it is: the known templates' control tokens (CONTROL_TOKENS), and when a tokenizer is given, its
    own special tokens too (longest first)."""
    tokens = dict(CONTROL_TOKENS)
    if tokenizer is not None:
        for s in sorted(special_tokens(tokenizer), key=len, reverse=True):
            if len(s) >= SPECIAL_MIN_CHARS:
                tokens.setdefault(s, "a special token of this tokenizer")
    return tokens


def control_token_hits(examples: Sequence[dict], tokens: dict[str, str] | None = None,
                       path: str | None = None) -> list[tuple[str, str]]:
    """(file:line, token) for each control token (default: CONTROL_TOKENS) written inside an example's messages or
    retrieved context, in the examples' order. file: the example's own 'file', else path."""
    tokens = CONTROL_TOKENS if tokens is None else tokens
    hits = []
    for ex in examples:
        text = "\n".join(m["content"] for m in conversation(ex))
        where = f"{ex.get('file') or path}:{ex.get('line')}"
        hits += [(where, token) for token in tokens if token in text]
    return hits


def control_token_problems(examples: Sequence[dict], path: str, tokenizer=None) -> list[str]:
    """The control-token rule as `file:line: ...` problems, one per record and token."""
    tokens = control_tokens(tokenizer)
    return [f"{where}: chat-format control token {token!r} ({tokens[token]}) inside message content: trained as "
            "text, the model learns to write it; remove it (write plain messages: the model's template adds its own)"
            for where, token in control_token_hits(examples, tokens, path)]


def encode_examples(tokenizer, examples: Sequence[dict], max_length: int, truncation: str = "drop", where: str = "data"):
    """(encoded rows, stats). Examples whose answer would be cut are dropped and counted by default."""
    rows, lengths, dropped, truncated, no_labels = [], [], [], 0, []
    for ex in examples:
        enc = encode_conversation(tokenizer, conversation(ex), max_length=None)
        n = len(enc.input_ids)
        lengths.append(n)
        if enc.n_trained == 0:
            no_labels.append(ex.get("line"))
            continue
        if n > max_length:
            cut = encode_conversation(tokenizer, conversation(ex), max_length=max_length)
            if cut.answer_cut:
                if truncation == "error":
                    raise DataError(
                        f"{where}:{ex.get('line')}: {n} tokens, the answer would be cut at max_length {max_length}; "
                        "raise max_length or set truncation: drop"
                    )
                if truncation == "drop":
                    dropped.append(ex.get("line"))
                    continue
                truncated += 1
            enc = cut
            if enc.n_trained == 0:
                no_labels.append(ex.get("line"))
                continue
        rows.append(encoded_row(enc.input_ids, enc.labels, ex.get("line")))
    stats = {
        "examples": len(examples),
        "kept": len(rows),
        "dropped_too_long": len(dropped),
        "dropped_lines": dropped[:20],
        "truncated": truncated,
        "dropped_no_labels": len(no_labels),
        "lengths": length_report(lengths, max_length),
        "trained_tokens": sum(labelled_count(r) for r in rows),
        "tokens": sum(len(r["input_ids"]) for r in rows),
    }
    return rows, stats


def encoded_row(input_ids: Sequence[int], labels: Sequence[int], line=None) -> dict:
    """A training row: its ids and labels as int32 arrays. Python lists of ints held 20 KB a row of ~400 tokens (an
    object per id), 160 MB for the 8,000-example Scorecard set, for the whole run; the arrays hold 3 KB."""
    return {"input_ids": np.asarray(input_ids, dtype=np.int32), "labels": np.asarray(labels, dtype=np.int32),
            "line": line}


def labelled_count(row: dict) -> int:
    """How many of a row's positions carry a label (lists or arrays alike)."""
    return int(np.count_nonzero(np.asarray(row["labels"]) != IGNORE_INDEX))


def length_report(lengths: Sequence[int], max_length: int) -> dict:
    if not lengths:
        return {"n": 0}
    s = sorted(lengths)

    def pct(p: float) -> int:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]

    return {
        "n": len(s), "min": s[0], "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": s[-1],
        "over_max_length": sum(1 for x in s if x > max_length), "max_length": max_length,
        "max_length_for_99pct": pct(99),
    }
