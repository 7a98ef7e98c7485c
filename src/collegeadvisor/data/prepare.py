"""From validated examples to training ids through chat_format, with a never-silent truncation policy."""

from __future__ import annotations

from typing import Sequence

from collegeadvisor.chat_format import encode_conversation, with_context
from collegeadvisor.errors import DataError


def conversation(ex: dict) -> list[dict]:
    """An example's messages, with its retrieved context (if any) placed by chat_format."""
    return with_context(ex["messages"], ex["context"]) if ex.get("context") else ex["messages"]


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
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels, "line": ex.get("line")})
    stats = {
        "examples": len(examples),
        "kept": len(rows),
        "dropped_too_long": len(dropped),
        "dropped_lines": dropped[:20],
        "truncated": truncated,
        "dropped_no_labels": len(no_labels),
        "lengths": length_report(lengths, max_length),
        "trained_tokens": sum(sum(1 for x in r["labels"] if x != -100) for r in rows),
        "tokens": sum(len(r["input_ids"]) for r in rows),
    }
    return rows, stats


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
