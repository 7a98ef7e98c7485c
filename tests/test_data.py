import json

import numpy as np
import torch

import pytest

from collegeadvisor.data.loaders import dedupe, load_examples, split
from collegeadvisor.data.prepare import encode_examples, length_report
from collegeadvisor.errors import DataError
from helpers import write_jsonl

ALPACA = {"instruction": "What do nurses earn at Ohio State?", "input": "", "output": "A median of $65,432."}
SHAREGPT = {"conversations": [{"from": "human", "value": "Debt at Kent State?"}, {"from": "gpt", "value": "$23,250."}]}
MESSAGES = {"messages": [{"role": "user", "content": "Is it worth it?"}, {"role": "assistant", "content": "Yes."}]}


def test_three_forms_in_jsonl_json_and_csv(tmp_path):
    jl = write_jsonl(tmp_path / "d.jsonl", [ALPACA, SHAREGPT, MESSAGES])
    ex, problems = load_examples(jl)
    assert not problems and [e["messages"][0]["role"] for e in ex] == ["user"] * 3
    assert ex[1]["messages"][1] == {"role": "assistant", "content": "$23,250."}
    js = tmp_path / "d.json"
    js.write_text(json.dumps([ALPACA, SHAREGPT, MESSAGES], indent=2))
    ex2, _ = load_examples(js)
    assert [e["messages"] for e in ex2] == [e["messages"] for e in ex]
    assert [e["line"] for e in ex2] == [2, 7, 19]  # each record keeps the line it starts on
    csv = tmp_path / "d.csv"
    csv.write_text('instruction,input,output\n"What do nurses earn?",,"$65,432."\n')
    ex3, _ = load_examples(csv)
    assert ex3[0]["messages"][1]["content"] == "$65,432." and ex3[0]["line"] == 2


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "x", "output": \n', r"d.jsonl:2: malformed JSON"),
    ('{"instruction": "a"}\n', r"d.jsonl:1: alpaca record is missing field 'output'"),
    ('{"instruction": "a", "output": "  "}\n', r"d.jsonl:1: empty assistant reply"),
    ('{"messages": [{"role": "user"}]}\n', r"d.jsonl:1: messages\[0\] is missing field 'content'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"d.jsonl:1: no assistant reply"),
    ('{"prompt": "a", "completion": "b"}\n', r"d.jsonl:1: unknown record format"),
    ('{"conversations": [{"from": "alien", "value": "x"}]}\n', r"d.jsonl:1: conversations\[0\] has unknown speaker"),
])
def test_each_data_error_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(p)


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8"):
        load_examples(p)


def test_malformed_json_array_names_the_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(DataError, match=r"d.json:3: malformed JSON"):
        load_examples(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")


def test_non_strict_lists_every_problem(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n{"instruction": "c", "output": ""}\n')
    ex, problems = load_examples(p, strict=False)
    assert len(ex) == 1 and [x.split(":")[1] for x in problems] == ["2", "3"]
    with pytest.raises(DataError, match=r"and 1 more"):
        load_examples(p)


def test_dedupe_and_seeded_split():
    rows = [{"messages": [{"role": "user", "content": f"q{i % 10}"}, {"role": "assistant", "content": "a"}]} for i in range(20)]
    kept, dropped = dedupe(rows)
    assert len(kept) == 10 and dropped == 10
    a = split(kept, 0.2, seed=1)
    assert a == split(kept, 0.2, seed=1) and len(a[1]) == 2 and a != split(kept, 0.2, seed=2)


def test_long_answers_are_dropped_and_counted_never_silently_cut(tokenizer):
    ex = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * n}], "line": i + 1}
          for i, n in enumerate([3, 400])]
    rows, stats = encode_examples(tokenizer, ex, max_length=128, truncation="drop")
    assert len(rows) == 1 and stats["dropped_too_long"] == 1 and stats["dropped_lines"] == [2]
    with pytest.raises(DataError, match=r"data:2: .* answer would be cut at max_length 128"):
        encode_examples(tokenizer, ex, max_length=128, truncation="error")
    rows, stats = encode_examples(tokenizer, ex, max_length=128, truncation="truncate")
    assert len(rows) == 2 and stats["truncated"] == 1 and len(rows[1]["input_ids"]) == 128
    assert stats["lengths"]["over_max_length"] == 1 and stats["lengths"]["max"] > 128


def test_encoded_rows_hold_their_ids_as_int32_arrays_and_batch_as_lists_did(tokenizer):
    """A run keeps every encoded row in memory for its whole length: int32 arrays, not lists of Python ints (20 KB a
    row of ~400 tokens as a list, 3 KB as arrays). They batch to the same tensors, and the labelled count is the
    stats' own."""
    from collegeadvisor.data.prepare import labelled_count
    from collegeadvisor.train.batching import collate, collate_packed

    ex = [{"messages": [{"role": "user", "content": "q " * (i + 1)}, {"role": "assistant", "content": "a b c"}],
           "line": i + 1} for i in range(3)]
    rows, stats = encode_examples(tokenizer, ex, max_length=128)
    assert all(r[k].dtype == np.int32 and r[k].ndim == 1 for r in rows for k in ("input_ids", "labels"))
    as_lists = [{k: r[k].tolist() for k in ("input_ids", "labels")} for r in rows]
    pad = tokenizer.pad_token_id
    for a, b in ((collate(rows, pad), collate(as_lists, pad)),
                 (collate_packed([rows], pad), collate_packed([as_lists], pad))):
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert sum(labelled_count(r) for r in rows) == stats["trained_tokens"] == sum(labelled_count(r) for r in as_lists)
    assert stats["trained_tokens"] == sum(sum(1 for x in r["labels"] if x != -100) for r in as_lists) > 0


def test_length_report_percentiles():
    r = length_report(list(range(1, 101)), max_length=90)
    assert r["p50"] == 51 and r["max"] == 100 and r["over_max_length"] == 10 and r["max_length_for_99pct"] == 99


# ------------------------------------------------------------------ one set of data rules (issue 24): data validate
# The same rules, from data, are what `check` applies (tests/test_check.py: the control tokens and too few examples).
from collegeadvisor.cli import main  # noqa: E402
from collegeadvisor.data import loaders  # noqa: E402
from collegeadvisor.data.prepare import CONTROL_TOKENS, control_token_hits, control_tokens  # noqa: E402

GOOD = [dict(ALPACA, instruction=f"What do graduates of program {i} earn?") for i in range(3)]


@pytest.mark.parametrize("token", ["<|im_start|>", "<|im_end|>", "</s>", "<s>", "[INST]", "[/INST]", "<|user|>",
                                   "<|assistant|>", "<|endoftext|>"])
def test_validate_refuses_a_chat_templates_control_token_naming_file_line_and_token(tmp_path, capsys, token):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD + [dict(ALPACA, output=f"A median {token} of $65,432.")])
    assert main(["data", "validate", str(p)]) == 1
    out = capsys.readouterr().out
    hit = [line for line in out.splitlines() if line.startswith(f"{p}:4: ")]
    assert len(hit) == 1 and f"control token {token!r}" in hit[0] and "remove it" in hit[0], out
    assert f"{p}: 4 examples loaded, 1 problem;" in out


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "system", "content": "You are <|im_start|>system"},
                  {"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
    {"conversations": [{"from": "human", "value": "[INST] Q? [/INST]"}, {"from": "gpt", "value": "A."}]},
    {"instruction": "Q?", "output": "A.", "context": ["Ohio State <|im_end|> nursing: $65,432"]},
])
def test_validate_looks_in_every_message_and_the_retrieved_context(tmp_path, capsys, record):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD + [record])
    assert main(["data", "validate", str(p)]) == 1
    assert f"{p}:4: chat-format control token" in capsys.readouterr().out


def test_validate_passes_plain_text_that_only_looks_like_markup(tmp_path, capsys):
    rows = GOOD + [dict(ALPACA, output="Use <b>bold</b>, [1] and a < b > c; no <|control|> token known here.")]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    assert main(["data", "validate", str(p)]) == 0
    assert f"{p}: 4 examples loaded, 0 problems; training sees 4 unique examples out of 4 (0 duplicates dropped)" \
        in capsys.readouterr().out


def test_control_tokens_are_the_known_templates_plus_the_tokenizers_own(tinyllama_tokenizer):
    assert {"<|im_start|>", "<|im_end|>", "</s>", "<s>", "[INST]", "[/INST]", "<|user|>"} <= set(CONTROL_TOKENS)
    ex = [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A <unk> B"}], "line": 7}]
    assert control_token_hits(ex, path="d.jsonl") == []  # no tokenizer: the known templates' tokens only
    tokens = control_tokens(tinyllama_tokenizer)
    assert "<unk>" in tokens and set(CONTROL_TOKENS) <= set(tokens)
    assert control_token_hits(ex, tokens, path="d.jsonl") == [("d.jsonl:7", "<unk>")]


def test_validate_says_what_training_sees_and_refuses_a_file_of_one_example(tmp_path, capsys):
    copies = write_jsonl(tmp_path / "copies.jsonl", [ALPACA] * 30)
    assert main(["data", "validate", str(copies)]) == 1
    captured = capsys.readouterr()
    assert "training sees 1 unique example out of 30 (29 duplicates dropped)" in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"error: {copies}: 1 unique example out of 30 "
                                                                    "(29 duplicates dropped): every record is the same")
    assert "too few to train on" in captured.err and "internal error" not in captured.err
    one = write_jsonl(tmp_path / "one.jsonl", [ALPACA])
    assert main(["data", "validate", str(one)]) == 1
    assert "too few to train on" in capsys.readouterr().err
    two = write_jsonl(tmp_path / "two.jsonl", [ALPACA] * 5 + [MESSAGES])
    assert main(["data", "validate", str(two)]) == 0
    assert "training sees 2 unique examples out of 6 (4 duplicates dropped)" in capsys.readouterr().out


def test_the_minimum_is_one_setting_read_where_the_rule_runs(tmp_path, capsys, monkeypatch):
    p = write_jsonl(tmp_path / "d.jsonl", GOOD)
    assert main(["data", "validate", str(p)]) == 0
    monkeypatch.setattr(loaders, "MIN_UNIQUE_EXAMPLES", 4)
    assert main(["data", "validate", str(p)]) == 1
    assert "3 unique examples out of 3 (0 duplicates dropped): too few to train on; give at least 4" in \
        capsys.readouterr().err
    examples, _ = load_examples(p)
    kept, seen, problem = loaders.unique_examples(examples + examples[:1], "d.jsonl")
    assert len(kept) == 3 and seen == "3 unique examples out of 4 (1 duplicate dropped)" and problem
