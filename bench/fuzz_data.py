"""Dataset files fuzzed with hypothesis: valid but awkward records must load exactly, malformed and adversarial
ones must each give a `file:line:` error, and nothing may raise anything but DataError (a traceback).

- awkward, valid: alpaca / sharegpt / messages records in JSONL (LF or CRLF, a BOM, blank lines, raw U+2028),
  JSON arrays (any indent) and CSV; any printable unicode, very long answers, extra fields of any JSON type.
- bad: wrong value types, missing fields, unknown roles and speakers, empty replies, control characters, lone
  surrogates, a conversation ending on the user, non-object records, truncated or garbage lines, JSON nested
  thousands deep, integers past Python's digit limit, bytes that are not UTF-8.

    python bench/fuzz_data.py --examples 2000
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collegeadvisor.data.loaders import load_examples
from collegeadvisor.errors import DataError

# printable text: no control characters (Cc) and no surrogates (Cs); a letter keeps it from being blank
TEXT = st.builds(lambda a, b: a + "x" + b,
                 st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40),
                 st.text(st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from("\t\n\r\u2028\u2029 "),
                         max_size=40))
LONG = st.integers(20_000, 200_000).map(lambda n: ("A median of $65,432. " * (n // 21 + 1))[:n])
ANSWER = st.one_of(TEXT, TEXT, TEXT, LONG)
JSON_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
                        max_leaves=6)
EXTRA = st.dictionaries(st.sampled_from(["id", "meta", "score", "tags", "weight", "lang", "note"]), JSON_ANY,
                        max_size=2)


@st.composite
def valid_record(draw) -> tuple[dict, str]:
    """(record, the final assistant text it must load with)."""
    form = draw(st.sampled_from(["alpaca", "sharegpt", "messages"]))
    turns = draw(st.lists(st.tuples(TEXT, ANSWER), min_size=1, max_size=1 if form == "alpaca" else 3))
    system = draw(st.one_of(st.none(), TEXT))
    if form == "alpaca":
        rec = {"instruction": turns[0][0], "output": turns[0][1], "input": draw(st.one_of(st.just(""), TEXT))}
        if system:
            rec["system"] = system
    elif form == "sharegpt":
        rec = {"conversations": [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]}
        if system:
            rec["system"] = system
    else:
        msgs = [{"role": "system", "content": system}] if system else []
        rec = {"messages": msgs + [m for q, a in turns for m in ({"role": "user", "content": q},
                                                                  {"role": "assistant", "content": a})]}
    rec.update(draw(EXTRA))
    return rec, turns[-1][1]


CONTROL_CHARS = st.sampled_from(["\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\x9f"])
WRONG = st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.integers(), min_size=1, max_size=2),
                  st.dictionaries(st.just("k"), st.integers(), min_size=1, max_size=1))


@st.composite
def bad_record(draw) -> tuple[object, str]:
    """(a record that must be refused, the kind of fault)."""
    rec, _ = draw(valid_record())
    kind = draw(st.sampled_from(["wrong-type", "missing-field", "bad-role", "empty-reply", "control", "surrogate",
                                 "ends-on-user", "not-object", "no-user"]))
    form = "alpaca" if "instruction" in rec else "sharegpt" if "conversations" in rec else "messages"
    key = {"alpaca": "output", "sharegpt": "value", "messages": "content"}[form]
    msgs = rec.get("conversations") or rec.get("messages")
    last = msgs[-1] if msgs else rec
    if kind == "wrong-type":
        last[key] = draw(WRONG)
    elif kind == "missing-field":
        del last[key]
    elif kind == "bad-role":
        if form == "alpaca":
            rec = {"prompt": rec["instruction"], "completion": rec["output"]}
        else:
            last["from" if form == "sharegpt" else "role"] = draw(st.sampled_from(["robot", "", "Assistant ", 3]))
    elif kind == "empty-reply":
        last[key] = draw(st.sampled_from(["", " ", "\n\t "]))
    elif kind in ("control", "surrogate"):
        bad = draw(CONTROL_CHARS) if kind == "control" else draw(st.sampled_from(["\ud800", "\udfff", "\udc00"]))
        text = last[key]
        at = draw(st.integers(0, len(text)))
        last[key] = text[:at] + bad + text[at:]
    elif kind == "ends-on-user":
        if form == "alpaca":
            rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                {"role": "user", "content": rec["instruction"]}]}
        else:
            msgs.append({"from": "human", "value": "and?"} if form == "sharegpt" else {"role": "user", "content": "and?"})
    elif kind == "not-object":
        rec = draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), TEXT, st.none()))
    else:  # no-user: only assistant turns
        rec = {"messages": [{"role": "assistant", "content": "hello"}]}
    return rec, kind


@st.composite
def bad_line(draw) -> tuple[str, str]:
    """(a JSONL line that is not a valid record, the kind)."""
    kind = draw(st.sampled_from(["truncated", "garbage", "deep", "bigint", "two-records"]))
    rec, _ = draw(valid_record())
    line = json.dumps(rec, ensure_ascii=False)
    if kind == "truncated":
        return line[: draw(st.integers(1, len(line) - 1))], kind
    if kind == "garbage":
        return draw(st.sampled_from(["}", "{'single': 'quotes'}", "[1, 2", "nul", "{\"a\": tru}", "<html>", "{,}"])), kind
    if kind == "deep":
        n = draw(st.integers(5_000, 50_000))
        return "[" * n + "]" * n, kind
    if kind == "bigint":
        return '{"instruction": "q", "output": ' + "9" * draw(st.integers(4_400, 10_000)) + "}", kind
    return line + " " + line, kind


def dump(records: list, fmt: dict) -> bytes:
    """Records written as a file of the given format: jsonl/json/csv, CRLF, BOM, blank lines, ascii or not."""
    if fmt["kind"] == "csv":
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=["instruction", "input", "output"], lineterminator=fmt["eol"])
        w.writeheader()
        for r in records:
            w.writerow({k: r.get(k, "") for k in ("instruction", "input", "output")})
        text = buf.getvalue()
    elif fmt["kind"] == "json":
        text = json.dumps(records, ensure_ascii=fmt["ascii"], indent=fmt["indent"]).replace("\n", fmt["eol"])
    else:
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=fmt["ascii"]) for r in records]
        text = "".join(ln + fmt["eol"] + (fmt["eol"] if fmt["blank"] else "") for ln in lines)
    return (b"\xef\xbb\xbf" if fmt["bom"] else b"") + text.encode("utf-8", "surrogatepass")


FORMAT = st.fixed_dictionaries({"kind": st.sampled_from(["jsonl", "jsonl", "json", "csv"]),
                                "eol": st.sampled_from(["\n", "\r\n"]), "bom": st.booleans(), "ascii": st.booleans(),
                                "indent": st.sampled_from([None, 1, 2]), "blank": st.booleans()})


def _lines_of(records: list, fmt: dict) -> list[int]:
    """The line each record starts on in dump(records, fmt)."""
    text = dump(records, fmt).decode("utf-8", "surrogatepass").lstrip("\ufeff")
    if fmt["kind"] == "jsonl":
        return [1 + i * (2 if fmt["blank"] else 1) for i in range(len(records))]
    if fmt["kind"] == "csv":
        starts, reader = [], csv.reader(io.StringIO(text, newline=""))
        next(reader)
        line = reader.line_num + 1
        for _ in reader:
            starts.append(line)
            line = reader.line_num + 1
        return starts
    per = [json.dumps(r, ensure_ascii=fmt["ascii"], indent=fmt["indent"]).count("\n") for r in records]
    if fmt["indent"] is None:
        return [1] * len(records)
    starts, line = [], 2
    for n in per:
        starts.append(line)
        line += n + 1
    return starts


class Tally:
    def __init__(self):
        self.counts = Counter()
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.counts["failures"] += 1
        if len(self.failures) < 5:
            self.failures.append(what)


def check_valid(tally: Tally, folder: Path, items: list, fmt: dict) -> None:
    if fmt["kind"] == "csv":  # CSV holds the alpaca form only
        items = [(r, a) for r, a in items if "instruction" in r and not r.get("system")]
        if not items:
            return
    path = folder / f"data.{fmt['kind']}"
    path.write_bytes(dump([r for r, _ in items], fmt))
    tally.counts["valid_records"] += len(items)
    try:
        examples, problems = load_examples(path)
    except DataError as exc:
        tally.fail(f"valid file refused: {exc}")
        return
    except Exception:  # noqa: BLE001 - a traceback is what this counts
        tally.counts["tracebacks"] += 1
        tally.fail(traceback.format_exc(limit=3))
        return
    got = [e["messages"][-1]["content"] for e in examples]
    if got != [a for _, a in items] or [e["line"] for e in examples] != _lines_of([r for r, _ in items], fmt):
        tally.fail(f"valid file loaded differently ({fmt})")


def check_bad(tally: Tally, folder: Path, items: list, bad, at: int, fmt: dict, kind: str) -> None:
    records = [r for r, _ in items]
    records.insert(at, bad)
    path = folder / f"data.{fmt['kind']}"
    path.write_bytes(dump(records, fmt))
    tally.counts["bad_records"] += 1
    tally.counts[f"bad:{kind}"] += 1
    starts = _lines_of(records, fmt) + [10**9]
    # the record's first line, or (a multi-line JSON record) the line inside it that holds the fault
    want = [f"{path}:{n}:" for n in range(starts[at], max(starts[at] + 1, min(starts[at + 1], starts[at] + 200)))]
    try:
        _, problems = load_examples(path, strict=False)
        if not any(p.startswith(w) for p in problems for w in want):
            tally.fail(f"{kind} not reported at {want[0]!r}: {problems[:2]}")
    except DataError as exc:  # a fault that stops reading the file (a JSON array cannot resync): still file:line
        if not any(str(exc).startswith(w) for w in want):
            tally.fail(f"{kind}: {exc} (expected {want[0]})")
    except Exception:  # noqa: BLE001
        tally.counts["tracebacks"] += 1
        tally.fail(traceback.format_exc(limit=3))


def run(examples: int = 200, seed: int | None = None) -> dict:
    """Hypothesis-driven: `examples` valid files and as many files with one bad record or line each."""
    tally = Tally()
    common = settings(max_examples=examples, deadline=None, database=None, derandomize=seed is not None,
                      suppress_health_check=list(HealthCheck))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        @common
        @given(st.lists(valid_record(), min_size=1, max_size=6), FORMAT)
        def valid(items, fmt):
            check_valid(tally, folder, items, fmt)

        @common
        @given(st.lists(valid_record(), max_size=5), bad_record(), st.data(), FORMAT.filter(lambda f: f["kind"] != "csv"))
        def bad(items, bad, data, fmt):
            at = data.draw(st.integers(0, len(items)))
            check_bad(tally, folder, items, bad[0], at, fmt, bad[1])

        @common
        @given(st.lists(valid_record(), max_size=5), bad_line(), st.data(),
               FORMAT.filter(lambda f: f["kind"] == "jsonl"))
        def bad_lines(items, line, data, fmt):
            at = data.draw(st.integers(0, len(items)))
            check_bad(tally, folder, items, line[0], at, fmt, line[1])

        @common
        @given(st.lists(valid_record(), min_size=1, max_size=4), st.binary(min_size=1, max_size=4).filter(
            lambda b: not _is_utf8(b) and b"\n" not in b), st.data())
        def not_utf8(items, junk, data):
            fmt = {"kind": "jsonl", "eol": "\n", "bom": False, "ascii": True, "indent": None, "blank": False}
            raw = dump([r for r, _ in items], fmt)
            at = data.draw(st.integers(0, len(items) - 1))
            lines = raw.split(b"\n")
            lines[at] = lines[at][:-1] + junk + b"}" if lines[at] else junk
            path = folder / "data.jsonl"
            path.write_bytes(b"\n".join(lines))
            tally.counts["bad_records"] += 1
            tally.counts["bad:not-utf8"] += 1
            try:
                load_examples(path, strict=False)
                tally.fail("bytes that are not UTF-8 were accepted")
            except DataError as exc:
                if not str(exc).startswith(f"{path}:{at + 1}:"):
                    tally.fail(f"not-utf8: {exc} (expected line {at + 1})")
            except Exception:  # noqa: BLE001
                tally.counts["tracebacks"] += 1
                tally.fail(traceback.format_exc(limit=3))

        for test in (valid, bad, bad_lines, not_utf8):
            test()
    return {"valid_records": tally.counts["valid_records"], "bad_records": tally.counts["bad_records"],
            "tracebacks": tally.counts["tracebacks"], "failures": tally.counts["failures"],
            "first_failures": tally.failures,
            "bad_kinds": {k[4:]: v for k, v in sorted(tally.counts.items()) if k.startswith("bad:")}}


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=500, help="hypothesis examples per kind of file")
    args = ap.parse_args(argv)
    result = run(args.examples)
    print(json.dumps(result, indent=2))
    return 0 if result["tracebacks"] == 0 and result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
