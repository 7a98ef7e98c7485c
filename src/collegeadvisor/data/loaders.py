"""The user's data: JSON, JSONL or CSV in alpaca, sharegpt or messages form, validated with file:line errors.

Every record becomes `{"messages": [...], "line": N, "source": ..., "context": [...]}`; tokenizing is
chat_format's job, not this module's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, Iterator

from collegeadvisor.errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
MAX_REPORTED = 5


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8") from exc


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, record) pairs; a malformed record is a DataError naming file:line."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}
        return
    if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
        return
    # a JSON array (or {"data": [...]}) decoded element by element so each record keeps its line
    decoder = json.JSONDecoder()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    if isinstance(whole, dict):
        lists = [v for v in whole.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}:1: expected a JSON array of examples (or an object holding one array)")
        start = text.index("[", text.index(next(k for k, v in whole.items() if isinstance(v, list))))
    elif isinstance(whole, list):
        start = text.index("[")
    else:
        raise DataError(f"{path}:1: expected a JSON array of examples, got {type(whole).__name__}")
    pos = start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        obj, end = decoder.raw_decode(text, pos)
        yield _line_of(text, pos), obj
        pos = end


def _to_messages(rec: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if isinstance(msgs, str):  # CSV cell holding JSON
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: field 'messages' is not valid JSON") from exc
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
        out = []
        for i, m in enumerate(msgs):
            if "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] is missing field '{'role' if 'role' not in m else 'content'}'")
            if m["role"] not in ("system", "user", "assistant"):
                raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; use system, user or assistant")
            out.append({"role": m["role"], "content": "" if m["content"] is None else str(m["content"])})
        return out
    if "conversations" in rec:
        conv = rec["conversations"]
        if not isinstance(conv, list):
            raise DataError(f"{where}: field 'conversations' must be a list of {{from, value}} objects")
        out = []
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise DataError(f"{where}: conversations[{i}] needs fields 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(m["from"]).lower())
            if role is None:
                raise DataError(f"{where}: conversations[{i}] has unknown speaker {m['from']!r}")
            out.append({"role": role, "content": str(m["value"] or "")})
        if rec.get("system"):
            out.insert(0, {"role": "system", "content": str(rec["system"])})
        return out
    if "instruction" in rec or "output" in rec:
        for field in ("instruction", "output"):
            if field not in rec:
                raise DataError(f"{where}: alpaca record is missing field '{field}'")
        prompt = str(rec["instruction"] or "").strip()
        if rec.get("input"):
            prompt = f"{prompt}\n\n{str(rec['input']).strip()}"
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(rec["output"] or "")}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": str(rec["system"])})
        return msgs
    raise DataError(
        f"{where}: unknown record format (fields: {', '.join(sorted(rec)) or 'none'}); "
        "expected 'messages', 'conversations' (sharegpt) or 'instruction'/'output' (alpaca)"
    )


def _validate(msgs: list[dict[str, str]], where: str) -> None:
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: no user message")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant reply to train on")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: empty assistant reply (message {i}); an empty target teaches empty answers")
        if m["role"] == "user" and not m["content"].strip():
            raise DataError(f"{where}: empty user message (message {i})")


def load_examples(path: str | Path, strict: bool = True) -> tuple[list[dict], list[str]]:
    """Examples and the problems found. strict: raise on the first problem (with the count of all)."""
    path = Path(path)
    examples, problems = [], []
    for line, rec in _records(path):
        where = f"{path}:{line}"
        try:
            msgs = _to_messages(rec, where)
            _validate(msgs, where)
        except DataError as exc:
            problems.append(str(exc))
            continue
        ex = {"messages": msgs, "line": line}
        for key in ("source", "kind", "context"):
            if isinstance(rec, dict) and rec.get(key) is not None:
                ex[key] = rec[key]
        examples.append(ex)
    if strict and problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    if not examples and not problems:
        raise DataError(f"{path}: no examples")
    return examples, problems


def example_key(ex: dict) -> str:
    return hashlib.sha256(json.dumps([ex["messages"], ex.get("context")], sort_keys=True).encode()).hexdigest()


def dedupe(examples: list[dict]) -> tuple[list[dict], int]:
    seen, out = set(), []
    for ex in examples:
        k = example_key(ex)
        if k not in seen:
            seen.add(k)
            out.append(ex)
    return out, len(examples) - len(out)


def split(examples: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/validation split; at least one validation example when asked for any."""
    if val_fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val_idx], [examples[i] for i in sorted(val_idx)]


def train_val(examples: list[dict], val_examples: list[dict] | None, val_fraction: float, seed: int,
              max_examples: int | None = None) -> tuple[list[dict], list[dict], int]:
    """The one rule for which examples train and which validate (train and check both use it): dedupe; the given
    validation examples, else a seeded split; then at most max_examples training examples, a seeded sample.
    Returns (train, val, duplicates dropped)."""
    examples, n_dupes = dedupe(examples)
    if val_examples is not None:
        train, val = examples, list(val_examples)
    else:
        train, val = split(examples, val_fraction, seed)
    if max_examples and len(train) > max_examples:
        train = random.Random(seed).sample(train, max_examples)
    return train, val, n_dupes


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
