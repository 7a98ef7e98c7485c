"""Small builders shared by tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def advisor_rows(n: int = 48) -> list[dict]:
    return [
        {"instruction": f"What do graduates of program {i} earn at school {i % 7}?",
         "output": f"Graduates earned a median of ${30000 + i * 37:,} four years after completion."}
        for i in range(n)
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
