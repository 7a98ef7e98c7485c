"""The College Scorecard instruction-dataset builder, on a slice of the real table (and once on all of it)."""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from collegeadvisor.data.fields import FIELD, KIND
from collegeadvisor.data.scorecard import load_table, read_row, row_document, row_values, row_title
from collegeadvisor.data.scorecard_answers import no_data_note
from collegeadvisor.data.scorecard_qa import (
    ASKED_ONLY_SHARE,
    FIRST_SHARE,
    KIND_MIX,
    MAX_PASSAGES,
    build_scorecard_dataset,
    retrieval_spec,
)
from collegeadvisor.errors import AdvisorError, DataError
from collegeadvisor.grounding import check
from collegeadvisor.grounding.claims import cited_at, field_at

N, HELD = 400, 60
TALK = {"follow_up", "no_row", "unknown_school", "ambiguous", "off_topic"}
HELDOUT_KEYS = {"question", "answer", "numeric", "kind", "source", "context", "context_ids"}


@pytest.fixture(scope="module")
def table():
    """Every program of one school in 40: ~6,000 rows, about 70% of them without earnings."""
    df = load_table()
    schools = sorted(df["unitid"].unique())[::40]
    return df[df["unitid"].isin(schools)]


@pytest.fixture(scope="module")
def built(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("scorecard")
    stats = build_scorecard_dataset(out, n_examples=N, n_heldout=HELD, seed=0, table=table)
    return stats, read(out / "scorecard.jsonl"), read(out / "heldout.jsonl")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def row_ids(source):
    ids = {source["row_id"]} if "row_id" in source else set() | ({source["compare_with"]["row_id"]} if "compare_with" in source else set())
    return ids | {r["row_id"] for r in source.get("rows", [])}


def by_id(table):
    return {r["row_id"]: r for r in table.to_dict("records")}


def row_name_of(source):
    return row_title(source["credential"], source["program"], source["school"])


def check_answer(kind, answer, source, context, rows):
    """The answer cites its rows and carries each figure as the row's document writes it."""
    if kind in ("not_in_context", "no_context"):
        assert "[" not in answer and "$" not in answer
        assert ("don't cover" in answer) if kind == "not_in_context" else ("Name a school" in answer)
        return
    docs = [row_document(rows[r]) for r in sorted(row_ids(source))]
    for doc in docs:
        assert f"[{context.index(doc) + 1}]" in answer  # every asked row is cited by its place in the context
    vals = row_values(rows[source["row_id"]])
    if kind == "earnings":
        assert f"after completion: {vals['earnings']}." in answer
    elif kind == "debt":
        assert f"Median debt: {vals['debt']}." in answer
    elif kind == "debt_to_earnings":
        assert f"Debt-to-earnings ratio: {vals['ratio']}" in answer and vals["debt"] in answer
    elif kind == "premium":
        verdict = "passes" if not vals["premium"].startswith("-") else "fails"
        assert answer.split(" ", 1)[1].startswith("Yes." if verdict == "passes" else "No.")
        assert f"Earnings premium: {vals['premium']}, so it {verdict} the test" in answer
        assert vals["hs_earnings"] in answer
    elif kind == "compare":
        other = row_values(rows[source["compare_with"]["row_id"]])
        assert vals["earnings"] in answer and other["earnings"] in answer
    elif kind == "no_data":
        assert "$" not in answer and ": no data (" in answer
        assert ("] Unknown." in answer) == (source["asked"] == "premium")
    elif kind == "open":
        assert len(row_ids(source)) >= 2
    elif kind in KIND and not KIND[kind].answers:  # a kind of the registry answered in the plain form
        f = FIELD[KIND[kind].field]
        assert f"] {row_name_of(source)}. {f.label.split(' {')[0]}" in answer and f": {vals[f.name]}." in answer
    else:
        raise AssertionError(kind)
    assert check(answer, context)["status"] == "verified"


def test_training_examples_cite_their_rows(built, table):
    stats, train, _ = built
    rows = by_id(table)
    assert len(train) == stats["examples"] == N
    counts = stats["kinds"]
    assert sum(counts.values()) == N and set(counts) - TALK == set(KIND_MIX) | {"not_in_context", "no_context"}
    assert counts["compare"] == round(N * KIND_MIX["compare"]) and counts["open"] == round(N * KIND_MIX["open"])
    templated = [ex for ex in train if "talk" not in ex["source"]]  # tests/test_scorecard_talk.py has the rest
    assert len(templated) > 0.85 * N
    for ex in templated:
        user, assistant = ex["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert ex["source"].get("loose") or ex["source"]["school"] in user["content"]
        check_answer(ex["kind"], assistant["content"], ex["source"], ex["context"], rows)
    premium = [ex["messages"][1]["content"] for ex in train if ex["kind"] == "premium"]
    assert any("fails the test" in a for a in premium) and any("passes the test" in a for a in premium)
    assert len({ex["messages"][0]["content"] for ex in templated}) == len(templated)  # no question twice
    assert stats["retrieval"] == retrieval_spec()


def test_every_no_data_reason_is_the_one_no_data_note_gives(built):
    """The reason after "no data" in the dataset's answers is `no_data_note`'s for the slot's field and cited row:
    the one definition that decoding writes and the check holds answers to."""
    _, train, held = built
    seen = set()
    for ex in train + held:
        answer = ex["messages"][-1]["content"] if "messages" in ex else ex["answer"]
        for m in re.finditer(r"no data \(([^()]*)\)", answer):
            name, n = field_at(answer, m.start()), cited_at(answer, m.start())
            values = read_row(ex["context"][n - 1])["values"]
            assert m.group(1) == no_data_note(name, values), (answer, name)
            seen.add((name, m.group(1)[:3]))
    assert {("earnings", "sup"), ("ratio", "its"), ("completers", "not")} <= seen  # each kind of reason is read


def test_heldout_schema_and_disjoint_rows(built, table):
    stats, train, heldout = built
    rows = by_id(table)
    assert len(heldout) == stats["heldout"] == HELD
    assert {ex["kind"] for ex in heldout} == set(KIND_MIX)
    trained = set().union(*(row_ids(ex["source"]) for ex in train))
    held_rows = set()
    for ex in heldout:
        extra = {"yes"} if ex["kind"] == "premium" else {"values"} if ex["kind"] == "open" else set()
        assert set(ex) == HELDOUT_KEYS | extra
        check_answer(ex["kind"], ex["answer"], ex["source"], ex["context"], rows)
        src = ex["source"]
        if ex["kind"] in KIND:  # the asked field's value in the table
            f = FIELD[KIND[ex["kind"]].field]
            value = float(rows[src["row_id"]][f.column])
            expected = round(value, 2) if f.value == "ratio" else value
        else:
            expected = {"compare": src.get("earnings"), "no_data": None, "open": None}[ex["kind"]]
        assert ex["numeric"] == expected
        if ex["kind"] == "premium":
            assert ex["yes"] is (ex["numeric"] > 0)
        if ex["kind"] == "open":
            assert ex["values"] and all(v in [rows[r]["earnings"] for r in row_ids(src)] for v in ex["values"])
        assert row_ids(src) <= set(ex["context_ids"])
        held_rows |= row_ids(src)
    assert held_rows and not held_rows & trained
    # nor does any training context show a held-out row
    docs = {row_document(r): r["row_id"] for r in table.to_dict("records")}
    shown = {docs[p] for ex in train for p in ex["context"]}
    assert not shown & held_rows


def test_contexts_are_built_as_raft_builds_them(built, table):
    """The right row among hard distractors, mostly first; alone in some (as answers read it without neighbours);
    missing in some; none at all in a few."""
    _, train, _ = built
    rows = by_id(table)
    docs = {r: row_document(rows[r]) for r in rows}
    first = single = alone = covered = 0
    hard = total = 0
    for ex in train:
        ctx = ex["context"]
        assert len(set(ctx)) == len(ctx) <= MAX_PASSAGES
        if "talk" in ex["source"]:
            continue
        truth = [docs[r] for r in row_ids(ex["source"])]
        if ex["kind"] == "no_context":
            assert ctx == []
            continue
        if ex["kind"] == "not_in_context":
            assert not set(truth) & set(ctx) and len(ctx) == MAX_PASSAGES
            continue
        assert set(truth) <= set(ctx)
        covered += 1
        if set(ctx) == set(truth):
            alone += 1
            continue
        if len(truth) == 1:
            single += 1
            first += ctx[0] == truth[0]
        asked = rows[ex["source"]["row_id"]]
        for doc in set(ctx) - set(truth):
            total += 1
            other = next(r for r in rows.values() if row_document(r) == doc) if total < 200 else None
            if other is not None:
                hard += other["unitid"] == asked["unitid"] or other["cip_code"] == asked["cip_code"]
    assert abs(first / single - FIRST_SHARE) < 0.1 and first < single
    assert abs(alone / covered - ASKED_ONLY_SHARE) < 0.1
    assert hard >= 0.8 * min(total, 199)
    no_data = [ex for ex in train if ex["kind"] == "no_data"]
    padded = [ex for ex in no_data if len(ex["context"]) > 1]
    with_figures = sum(any("$" in d for d in ex["context"] if d not in [docs[ex["source"]["row_id"]]]) for ex in padded)
    assert with_figures >= 0.7 * len(padded)  # suppressed right row, distractors that carry figures


def test_deterministic_for_a_seed(table, tmp_path):
    args = dict(n_examples=150, n_heldout=20, table=table)
    build_scorecard_dataset(tmp_path / "a", seed=3, **args)
    build_scorecard_dataset(tmp_path / "b", seed=3, **args)
    build_scorecard_dataset(tmp_path / "c", seed=4, **args)
    for name in ("scorecard.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_bad_settings_and_tables(table, tmp_path):
    with pytest.raises(AdvisorError, match="n_examples"):
        build_scorecard_dataset(tmp_path, n_examples=0, table=table)
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
    for kind in ("compare", "open"):
        assert stats["kinds"][kind] == round(8000 * KIND_MIX[kind])
    train = read(tmp_path / "scorecard.jsonl")
    assert len({ex["messages"][0]["content"] for ex in train}) == 8000
    assert sum(1 for ex in train if ex["context"]) == stats["retrieval_grounded"] >= 0.95 * 8000
    assert all(ex["context"] for ex in read(tmp_path / "heldout.jsonl"))


def test_a_dataset_from_another_builder_is_not_current(built, tmp_path, monkeypatch):
    """The quickstart rebuilds a dataset that an older builder wrote (other kinds or words), never trains on it."""
    import collegeadvisor.data.scorecard_qa as qa

    out = tmp_path / "ds"
    qa.build_scorecard_dataset(out, n_examples=40, n_heldout=0, seed=0, table=load_table().head(3000))
    assert qa.dataset_is_current(out)
    monkeypatch.setattr(qa, "STRUCTURAL_MIX", {**qa.STRUCTURAL_MIX, "open": 0.2})  # a builder of other shares
    assert not qa.dataset_is_current(out)
    monkeypatch.undo()
    (out / "dataset.json").unlink()  # a dataset from before the builder recorded itself
    assert not qa.dataset_is_current(out)
