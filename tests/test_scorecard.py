"""The College Scorecard instruction-dataset builder, on a slice of the real table (and once on all of it)."""

from __future__ import annotations

import json
import math
import time

import pytest

from collegeadvisor.data.scorecard import (
    DISTRACTORS,
    MAX_PASSAGES,
    KIND_MIX,
    build_scorecard_dataset,
    load_table,
    money,
    row_document,
)
from collegeadvisor.errors import AdvisorError, DataError

N, HELD = 400, 60
HELDOUT_KEYS = {"question", "answer", "numeric", "kind", "source", "context"}


@pytest.fixture(scope="module")
def table():
    """Every program of one school in 40: ~6,000 rows, about 70% of them without earnings."""
    df = load_table()
    schools = sorted(df["unitid"].unique())[::40]
    return df[df["unitid"].isin(schools)]


@pytest.fixture(scope="module")
def built(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("scorecard")
    stats = build_scorecard_dataset(out, n_examples=N, n_heldout=HELD, seed=0, rag_fraction=0.5, table=table)
    return stats, read(out / "scorecard.jsonl"), read(out / "heldout.jsonl")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def row_ids(source):
    return {source["row_id"]} | ({source["compare_with"]["row_id"]} if "compare_with" in source else set())


def check_answer(kind, answer, source):
    """The answer carries its source row's figure as money() writes it (or, for no_data, no figure at all)."""
    if kind == "earnings":
        assert money(source["earnings"]) in answer
        assert ("four years" if source["earnings_horizon"].startswith("4yr") else "one year") in answer
    elif kind == "debt":
        assert money(source["debt_median"]) in answer
    elif kind == "debt_to_earnings":
        assert f"{source['debt_to_earnings_ratio']:.2f}" in answer
        assert money(source["debt_median"]) in answer and money(source["earnings"]) in answer
    elif kind == "premium":
        prem = source["earnings_premium_state"]
        assert answer.startswith("Yes." if prem > 0 else "No.")
        assert money(abs(prem)) in answer and money(source["earnings_threshold_state"]) in answer
    elif kind == "compare":
        other = source["compare_with"]
        assert source["earnings"] > other["earnings"]
        assert money(source["earnings"]) in answer and money(other["earnings"]) in answer
        assert answer.index(money(source["earnings"])) < answer.index(money(other["earnings"]))
    elif kind == "no_data":
        assert "$" not in answer and "no " in answer and "suppressed" in answer
    elif kind == "not_in_context":
        assert "$" not in answer and "don't cover" in answer
    else:
        raise AssertionError(kind)
    for src in (source, source.get("compare_with", source)):
        assert src["school"] in answer and src["program"] in answer and src["credential"] in answer
    assert answer.endswith("(College Scorecard).") or kind in ("no_data", "not_in_context")


def test_training_examples_answer_with_their_rows_figures(built):
    stats, train, _ = built
    assert len(train) == stats["examples"] == N
    counts = stats["kinds"]
    assert sum(counts.values()) == N and set(counts) == set(KIND_MIX) | {"not_in_context"}
    # not_in_context examples are taken out of the single-row kinds; compare keeps its exact share
    assert counts["compare"] == round(N * KIND_MIX["compare"])
    assert counts["earnings"] >= 0.8 * N * KIND_MIX["earnings"]
    for ex in train:
        user, assistant = ex["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert ex["source"]["school"] in user["content"]
        check_answer(ex["kind"], assistant["content"], ex["source"])
    premium = [ex for ex in train if ex["kind"] == "premium"]
    assert any(ex["messages"][1]["content"].startswith("No.") for ex in premium)
    assert len({ex["messages"][0]["content"] for ex in train}) == N  # no question twice


def test_heldout_schema_and_disjoint_rows(built, table):
    stats, train, heldout = built
    assert len(heldout) == stats["heldout"] == HELD
    assert {ex["kind"] for ex in heldout} == set(KIND_MIX)
    trained = set().union(*(row_ids(ex["source"]) for ex in train))
    docs = {row_document(r): r["row_id"] for r in table.to_dict("records")}
    held_rows = set()
    for ex in heldout:
        assert set(ex) == HELDOUT_KEYS | ({"yes"} if ex["kind"] == "premium" else set())
        assert isinstance(ex["question"], str) and isinstance(ex["answer"], str)
        check_answer(ex["kind"], ex["answer"], ex["source"])
        src = ex["source"]
        expected = {
            "earnings": src.get("earnings"),
            "debt": src.get("debt_median"),
            "debt_to_earnings": round(src.get("debt_to_earnings_ratio") or 0, 2),
            "premium": src.get("earnings_premium_state"),
            "compare": src.get("earnings"),
            "no_data": None,
        }[ex["kind"]]
        assert ex["numeric"] == expected
        if ex["kind"] == "premium":
            assert ex["yes"] is (ex["numeric"] > 0)
        # every held-out record carries a context holding its row(s), so eval can run with or without it
        assert row_ids(src) <= {docs[p] for p in ex["context"]}
        held_rows |= row_ids(src)
    assert held_rows and not held_rows & trained
    # nor does any training context show a held-out row
    shown = {docs[p] for ex in train for p in ex.get("context", [])}
    assert not shown & held_rows


def test_retrieval_grounded_contexts(built, table):
    stats, train, _ = built
    docs = {r["row_id"]: row_document(r) for r in table.to_dict("records")}
    grounded = [ex for ex in train if "context" in ex]
    assert len(grounded) == stats["retrieval_grounded"] == N // 2
    not_covered = [ex for ex in grounded if ex["kind"] == "not_in_context"]
    assert not_covered and all("context" in ex for ex in train if ex["kind"] == "not_in_context")
    for ex in grounded:
        ctx, answer = ex["context"], ex["messages"][1]["content"]
        truth = [docs[r] for r in row_ids(ex["source"])]
        assert len(set(ctx)) == len(ctx)
        if ex["kind"] == "not_in_context":
            assert not set(truth) & set(ctx) and DISTRACTORS[0] + len(truth) <= len(ctx) <= MAX_PASSAGES
        else:
            assert set(truth) <= set(ctx) and len(truth) + 1 <= len(ctx) <= min(MAX_PASSAGES, DISTRACTORS[1] + len(truth))
            # the answer is derivable from the context: each of its figures is written there
            for figure in (tok.rstrip(",.") for tok in answer.split() if tok.startswith("$")):
                assert any(figure in doc for doc in truth), (figure, answer)


def test_deterministic_for_a_seed(table, tmp_path):
    args = dict(n_examples=150, n_heldout=20, rag_fraction=0.3, table=table)
    build_scorecard_dataset(tmp_path / "a", seed=3, **args)
    build_scorecard_dataset(tmp_path / "b", seed=3, **args)
    build_scorecard_dataset(tmp_path / "c", seed=4, **args)
    for name in ("scorecard.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_bad_settings_and_tables(table, tmp_path):
    with pytest.raises(AdvisorError, match="rag_fraction"):
        build_scorecard_dataset(tmp_path, n_examples=10, rag_fraction=1.5, table=table)
    with pytest.raises(DataError, match="debt_median"):
        build_scorecard_dataset(tmp_path, n_examples=10, table=table.drop(columns=["debt_median"]))
    with pytest.raises(DataError, match="too few"):
        build_scorecard_dataset(tmp_path, n_examples=5000, n_heldout=10, table=table.head(300))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_row_document_without_state(table):
    row = table.iloc[0].to_dict() | {"state": math.nan}
    doc = row_document(row)
    assert "nan" not in doc and row["inst_name"] in doc


def test_full_table_default_scale(tmp_path):
    start = time.perf_counter()
    stats = build_scorecard_dataset(tmp_path)
    assert time.perf_counter() - start < 60
    assert stats["examples"] == 8000 and stats["heldout"] == 500
    for kind, share in KIND_MIX.items():
        assert stats["kinds"][kind] == round(8000 * share)
    train = read(tmp_path / "scorecard.jsonl")
    assert len({ex["messages"][0]["content"] for ex in train}) == 8000
    assert not any("context" in ex for ex in train)
    assert all("context" in ex for ex in read(tmp_path / "heldout.jsonl"))
