"""Held-out questions (`heldout.jsonl`, written by `collegeadvisor data scorecard`): read by eval, export --verify,
kb recall and the quickstart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from collegeadvisor.errors import AdvisorError, DataError

QUESTION_FIELDS = ("question", "answer", "numeric", "kind")


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number from 1, its JSON value) for each line that is not blank; a malformed line's value is its
    json.JSONDecodeError, and reading goes on."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            rec = exc
        yield n, rec


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--questions: {path} does not exist")
    out = []
    for n, rec in json_lines(path.read_text(encoding="utf-8").splitlines()):
        if isinstance(rec, json.JSONDecodeError):
            raise DataError(f"{path}:{n}: malformed JSON ({rec.msg})") from rec
        missing = [f for f in QUESTION_FIELDS if f not in rec]
        if missing:
            raise DataError(f"{path}:{n}: question record is missing field '{missing[0]}'")
        out.append(rec)
    return out[:limit] if limit else out


def default_questions(manifest: dict) -> Path:
    data = Path(manifest["data"]["path"])
    path = data.with_name("heldout.jsonl")
    if not path.is_file():
        raise AdvisorError(f"no held-out file beside {data}; pass --questions FILE (written by `collegeadvisor data scorecard`)")
    return path
