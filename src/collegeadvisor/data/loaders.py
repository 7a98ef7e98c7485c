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
import re
from pathlib import Path
from typing import Any, Iterator

from collegeadvisor.errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv"}
# C0 controls other than tab/newline/carriage return, DEL and C1: invisible junk (terminal escapes, NULs, PDF form
# feeds) that the model would learn to write; and lone UTF-16 surrogates, which are not text at all.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
SURROGATE = re.compile(r"[\ud800-\udfff]")


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _read_text(path: Path) -> str:
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a data file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unknown file type {path.suffix or '(no extension)'!r}; use .jsonl (one JSON "
                        "record per line), .json (an array of records) or .csv")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the file as UTF-8") from exc


def _decode_at(decoder: json.JSONDecoder, text: str, pos: int, path: Path, line0: int = 0) -> tuple[Any, int]:
    """One JSON value starting at text[pos] (text's first line is file line line0 + 1); any failure is a
    DataError naming the line."""
    try:
        return decoder.raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        line = line0 + _line_of(text, exc.pos)
        raise DataError(f"{path}:{line}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    except RecursionError as exc:
        raise DataError(f"{path}:{line0 + _line_of(text, pos)}: JSON nested too deeply") from exc
    except ValueError as exc:  # an integer with more digits than Python converts (4300)
        raise DataError(f"{path}:{line0 + _line_of(text, pos)}: malformed JSON (a number too long to read)") from exc


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Rows under the header line, each with the line it starts on (a quoted cell may span lines)."""
    csv.field_size_limit(min(max(csv.field_size_limit(), len(text) + 1), 2**31 - 1))  # a very long answer is fine
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows, None)
        start = rows.line_num + 1
        for values in rows:
            if values:
                if len(values) > len(header):
                    raise DataError(f"{path}:{start}: {len(values) - len(header)} more values than the header has "
                                    "columns")
                yield start, dict(zip(header, values + [""] * (len(header) - len(values))))
            start = rows.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{rows.line_num}: malformed CSV ({exc})") from exc


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Each line on its own: a malformed line is yielded as its DataError, and reading goes on."""
    decoder = json.JSONDecoder()
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 etc. are legal inside JSON strings
        line = line.lstrip("\ufeff").rstrip("\r")  # a BOM left by concatenated files; CRLF line ends
        if not line.strip():
            continue
        try:
            obj, end = _decode_at(decoder, line, len(line) - len(line.lstrip()), path, n - 1)
            if line[end:].strip():
                raise DataError(f"{path}:{n}: malformed JSON (extra data at column {end + 1}: one record per line)")
        except DataError as exc:
            yield n, exc
            continue
        yield n, obj


def _json_records(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """A JSON array (or {"data": [...]}) decoded element by element, so each record keeps its line and a bad one
    names its own line."""
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "{":
        whole, _ = _decode_at(decoder, text, start, path)
        lists = [k for k, v in whole.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}:1: expected a JSON array of examples (or an object holding one array)")
        start = _member_start(decoder, text, start, lists[0])
    elif text[start:start + 1] != "[":
        raise DataError(f"{path}:{_line_of(text, start)}: expected a JSON array of examples")
    pos, n = start + 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{_line_of(text, pos)}: malformed JSON (the array is not closed with ']')")
        if text[pos] == "]":
            return
        if n:
            if text[pos] != ",":
                raise DataError(f"{path}:{_line_of(text, pos)}: malformed JSON (expected ',' or ']' between records)")
            pos += 1
            while pos < len(text) and text[pos] in " \t\r\n":
                pos += 1
        obj, end = _decode_at(decoder, text, pos, path)
        yield _line_of(text, pos), obj
        pos, n = end, n + 1


def _member_start(decoder: json.JSONDecoder, text: str, start: int, key: str) -> int:
    """Where the value of top-level member `key` starts in the (already validated) JSON object at text[start]."""
    pos = start + 1
    while True:
        pos = len(text) - len(text[pos:].lstrip(" \t\r\n,"))
        name, pos = decoder.raw_decode(text, pos)
        pos = len(text) - len(text[pos:].lstrip(" \t\r\n:"))
        if name == key:
            return pos
        _, pos = decoder.raw_decode(text, pos)


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line, record) pairs; a malformed file or record is a DataError naming file:line."""
    text = _read_text(path)
    kind = SUFFIXES[path.suffix.lower()]
    if kind == "json" and _looks_like_jsonl(text):
        kind = "jsonl"  # a .json file holding one record per line
    return {"csv": _csv_records, "jsonl": _jsonl_records, "json": _json_records}[kind](path, text)


def _looks_like_jsonl(text: str) -> bool:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return len(lines) > 1 and all(ln.lstrip().startswith("{") and ln.rstrip().endswith("}") for ln in lines[:2])


def _text(value: Any, field: str, where: str, optional: bool = False) -> str:
    """A string field; None only where optional. Text parts ([{type: text, text}]) are joined."""
    if value is None and optional:
        return ""
    if isinstance(value, list) and value and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: {field} must be a string, got {got}")
    bad = SURROGATE.search(value) or CONTROL.search(value)
    if bad:
        what = "a lone UTF-16 surrogate" if SURROGATE.match(bad.group()) else "a control character"
        raise DataError(f"{where}: {field} holds {what} (U+{ord(bad.group()):04X}) at character {bad.start() + 1}; "
                        "remove it")
    return value


def _messages_form(rec: dict, where: str) -> list[dict[str, str]]:
    msgs = rec["messages"]
    if isinstance(msgs, str):  # CSV cell holding JSON
        try:
            msgs = json.loads(msgs)
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{where}: field 'messages' is not valid JSON") from exc
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        if "role" not in m or "content" not in m:
            raise DataError(f"{where}: messages[{i}] is missing field '{'role' if 'role' not in m else 'content'}'")
        if not isinstance(m["role"], str) or m["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; use system, user or assistant")
        out.append({"role": m["role"], "content": _text(m["content"], f"messages[{i}].content", where)})
    return out


def _sharegpt_form(rec: dict, where: str) -> list[dict[str, str]]:
    conv = rec["conversations"]
    if not isinstance(conv, list):
        raise DataError(f"{where}: field 'conversations' must be a list of {{from, value}} objects")
    out = []
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or "from" not in m or "value" not in m:
            raise DataError(f"{where}: conversations[{i}] needs fields 'from' and 'value'")
        role = SHAREGPT_ROLES.get(m["from"].lower()) if isinstance(m["from"], str) else None
        if role is None:
            raise DataError(f"{where}: conversations[{i}] has unknown speaker {m['from']!r}")
        out.append({"role": role, "content": _text(m["value"], f"conversations[{i}].value", where)})
    system = _text(rec.get("system"), "field 'system'", where, optional=True)
    return ([{"role": "system", "content": system}] if system else []) + out


def _alpaca_form(rec: dict, where: str) -> list[dict[str, str]]:
    for field in ("instruction", "output"):
        if field not in rec:
            raise DataError(f"{where}: alpaca record is missing field '{field}'")
    prompt = _text(rec["instruction"], "field 'instruction'", where).strip()
    extra = _text(rec.get("input"), "field 'input'", where, optional=True).strip()
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(rec["output"], "field 'output'", where)}]
    system = _text(rec.get("system"), "field 'system'", where, optional=True)
    return ([{"role": "system", "content": system}] if system else []) + msgs


def _to_messages(rec: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    if "messages" in rec:
        return _messages_form(rec, where)
    if "conversations" in rec:
        return _sharegpt_form(rec, where)
    if "instruction" in rec or "output" in rec:
        return _alpaca_form(rec, where)
    raise DataError(
        f"{where}: unknown record format (fields: {', '.join(sorted(map(str, rec))) or 'none'}); "
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
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {msgs[-1]['role']} message (message {len(msgs) - 1}); "
                        "it must end with the assistant's reply (an unanswered last turn trains nothing)")


def _context(rec: dict, where: str) -> list[str] | None:
    ctx = rec.get("context")
    if ctx is None:
        return None
    if isinstance(ctx, str):
        ctx = [ctx]
    if not isinstance(ctx, list):
        raise DataError(f"{where}: field 'context' must be a list of passages (strings), got {type(ctx).__name__}")
    return [_text(c, f"context[{i}]", where) for i, c in enumerate(ctx)]


def load_examples(path: str | Path, strict: bool = True,
                  warnings: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """Examples and the problems found. strict: raise on the first problem (with the count of all).
    warnings: a list that collects what loads but deserves a look (records repeated verbatim)."""
    path = Path(path)
    examples, problems, seen = [], [], {}
    for line, rec in _records(path):
        where = f"{path}:{line}"
        if isinstance(rec, DataError):  # a line that is not JSON
            problems.append(str(rec))
            continue
        try:
            msgs = _to_messages(rec, where)
            _validate(msgs, where)
            context = _context(rec, where)
        except DataError as exc:
            problems.append(str(exc))
            continue
        ex = {"messages": msgs, "line": line}
        for key in ("source", "kind"):
            if rec.get(key) is not None:
                ex[key] = rec[key]
        if context is not None:
            ex["context"] = context
        first = seen.setdefault(example_key(ex), line)
        if first != line and warnings is not None:
            warnings.append(f"{where}: the same example as line {first} (duplicates are dropped before training)")
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


MIN_UNIQUE_EXAMPLES = 2  # fewer different examples than this is nothing to train on (`data validate`, `check`)


def unique_examples(examples: list[dict], path: str | Path) -> tuple[list[dict], str, str | None]:
    """What training sees of a file's examples (dedupe, as train_val does): (the unique examples, that in words, "1
    unique example out of 30 (29 duplicates dropped)", and the one-line problem when they are fewer than
    MIN_UNIQUE_EXAMPLES, else None). A file with no valid example has its problems already: None here."""
    kept, n_dupes = dedupe(examples)
    n = len(kept)
    seen = (f"{n} unique example{'' if n == 1 else 's'} out of {len(examples)} "
            f"({n_dupes} duplicate{'' if n_dupes == 1 else 's'} dropped)")
    if not examples or n >= MIN_UNIQUE_EXAMPLES:
        return kept, seen, None
    same = "every record is the same example, " if n == 1 and n_dupes else ""
    return kept, seen, (f"{path}: {seen}: {same}too few to train on; give at least {MIN_UNIQUE_EXAMPLES} different "
                        "examples")


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


