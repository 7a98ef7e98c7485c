"""Hostile and awkward dataset files: every bad record is a `file:line:` error (never a traceback), every valid
but awkward one loads, `data validate` and `check --data` refuse or warn about what deserves it, and one answer
too long for the model is dropped and counted, not a stop. The fuzzing is bench/fuzz_data.py's (hypothesis)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from collegeadvisor import check
from collegeadvisor.cli import main
from collegeadvisor.config import load_config
from collegeadvisor.data.loaders import load_examples
from collegeadvisor.errors import DataError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fuzz_data

OK = {"instruction": "What do nurses earn at Ohio State?", "output": "A median of $65,432."}


def rows_with(bad, n=19) -> str:
    good = [dict(OK, instruction=f"What do graduates of program {i} earn?") for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in good) + (bad if isinstance(bad, str) else json.dumps(bad) + "\n")


def test_fuzzed_files_load_or_name_the_line_and_never_traceback():
    result = fuzz_data.run(examples=150, seed=0)  # derandomized in CI; make reliability explores at random
    assert result["tracebacks"] == 0 and result["failures"] == 0, result["first_failures"]
    assert result["bad_records"] >= 450 and result["valid_records"] >= 150
    assert len(result["bad_kinds"]) >= 12  # every kind of fault was tried


@pytest.mark.parametrize("bad, message", [
    ({"instruction": "q", "output": 12345}, r":20: field 'output' must be a string, got int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"a": 1}}]},
     r":20: messages\[1\].content must be a string, got dict"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "and?"}]}, r":20: the conversation ends with a user message"),
    ({"instruction": "q\x1b[31m", "output": "a"}, r":20: field 'instruction' holds a control character \(U\+001B\)"),
    ('{"instruction": "q\\ud800", "output": "a"}\n', r":20: field 'instruction' holds a lone UTF-16 surrogate"),
    ("[" * 20000 + "]" * 20000 + "\n", r":20: JSON nested too deeply"),
    ('{"instruction": "q", "output": ' + "9" * 5000 + "}\n", r":20: malformed JSON \(a number too long"),
    ('{"instruction": "q", "output": "a"} {"x": 1}\n', r":20: malformed JSON \(extra data"),
])
def test_each_line_fault_names_its_line(tmp_path, bad, message):
    p = tmp_path / "d.jsonl"
    p.write_text(rows_with(bad), encoding="utf-8")
    _, problems = load_examples(p, strict=False)
    assert len(problems) == 1 and problems[0].startswith(str(p)), problems
    assert __import__("re").search(message, problems[0]), problems[0]


def test_awkward_but_valid_files_load(tmp_path):
    long_answer = "Graduates earn a median of $65,432. " * 15000  # 540k characters
    rec = {"messages": [{"role": "user", "content": "Qu\u2028e gana\u0301n los enfermeros? \U0001F393"},
                        {"role": "assistant", "content": long_answer}], "id": 7, "meta": {"x": [1, None]}}
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (rows_with(json.dumps(rec, ensure_ascii=False) + "\n")).replace("\n", "\r\n")
                  .encode())
    ex, problems = load_examples(p)
    assert not problems and len(ex) == 20 and ex[-1]["messages"][1]["content"] == long_answer and ex[-1]["line"] == 20
    csv = tmp_path / "d.csv"
    csv.write_text(f'instruction,output,extra\n"What, exactly?","{long_answer}",x\n', encoding="utf-8")
    assert load_examples(csv)[0][0]["messages"][1]["content"] == long_answer  # past csv's 128k field limit


def test_unknown_extension_and_folder_are_refused(tmp_path):
    (tmp_path / "d.txt").write_text(rows_with(OK))
    with pytest.raises(DataError, match=r"d.txt: unknown file type '.txt'"):
        load_examples(tmp_path / "d.txt")
    with pytest.raises(DataError, match="a folder"):
        load_examples(tmp_path)


def test_json_array_faults_name_the_records_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"data": [\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": 5}\n]}\n')
    _, problems = load_examples(p, strict=False)
    assert problems == [f"{p}:3: field 'output' must be a string, got int"]
    p.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c", "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"d.json:3: malformed JSON \(expected ','"):
        load_examples(p)


def test_data_validate_warns_about_a_file_of_copies_and_refuses_bad_ones(tmp_path, capsys):
    copies = tmp_path / "copies.jsonl"
    copies.write_text((json.dumps(OK) + "\n") * 30)
    assert main(["data", "validate", str(copies)]) == 1  # one example is too little to train on (issue 24)
    captured = capsys.readouterr()
    out = captured.out
    assert out.count("warning: ") == 29 and f"{copies}:30: the same example as line 1" in out
    assert "training sees 1 unique example out of 30 (29 duplicates dropped)" in out
    assert captured.err.count("\n") == 1 and "too few to train on" in captured.err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(rows_with({"instruction": "q", "output": ["a list"]}))
    assert main(["data", "validate", str(bad)]) == 1
    assert f"{bad}:20: field 'output' must be a string, got list" in capsys.readouterr().out
    assert main(["data", "validate", str(tmp_path / "x.parquet")]) == 1
    assert "x.parquet: no such file" in capsys.readouterr().err


def preflight(tmp_path, model, text: str, **kw):
    data = tmp_path / "data.jsonl"
    data.write_text(text, encoding="utf-8")
    cfg = load_config(None, dict(base_model=str(model), data=str(data), output_dir=str(tmp_path / "runs"),
                                 max_length=256, val_fraction=0.0, **kw))
    return check.run_checks(cfg, measure=False)


def test_check_drops_and_counts_one_answer_longer_than_the_model(tmp_path, tinyllama_tiny_model):
    huge = {"instruction": "Tell me everything.", "output": "Graduates earn a median of $65,432. " * 15000}
    findings = preflight(tmp_path, tinyllama_tiny_model, rows_with(huge))
    f = next(f for f in findings if f.code == "beyond-model")
    assert f.level == "warning" and "dropped from training and counted" in f.message and f.where.endswith(":20")
    assert not check.errors(findings), [str(x) for x in check.errors(findings)]
    strict = preflight(tmp_path, tinyllama_tiny_model, rows_with(huge), truncation="error")
    assert any(f.code == "beyond-model" and f.level == "error" for f in strict)


def test_check_refuses_bad_records_and_warns_about_copies(tmp_path, tinyllama_tiny_model):
    bad = preflight(tmp_path, tinyllama_tiny_model, rows_with({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}))
    assert any(f.level == "error" and f.where.endswith("data.jsonl:20") and "ends with a user" in f.message
               for f in bad)
    copies = preflight(tmp_path, tinyllama_tiny_model, (json.dumps(OK) + "\n") * 30)
    f = next(f for f in copies if f.code == "duplicate")
    assert f.level == "warning" and "29 records repeat" in f.message
    assert f.message.endswith("1 unique example out of 30 (29 duplicates dropped)")
    f = next(f for f in copies if f.code == "too-few-unique")  # the rule and minimum `data validate` applies
    assert f.level == "error" and f.where == str(tmp_path / "data.jsonl") and "too few to train on" in f.message
