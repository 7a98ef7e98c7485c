"""The field and question-kind registry (data.fields), and the kind it added end to end: completers ("how many
students finish the ... at ...?"), through the row text, the dataset, resolution, advise, decoding, the check and
eval's scores, with nothing but its registry entry."""

from __future__ import annotations

import random

import pytest

from collegeadvisor import advise, grounding
from collegeadvisor.data.fields import FIELD, FIELDS, KIND, KINDS, answer_cues, covers, question_cues
from collegeadvisor.data.scorecard import load_table, read_row, row_document, row_format_id, row_names, row_values
from collegeadvisor.data.scorecard_answers import answer_text, question_text, reference_for
from collegeadvisor.eval.metrics import score_reply
from collegeadvisor.kb.resolve import resolve_turn


@pytest.fixture(scope="module")
def rows():
    df = load_table()
    return df.sample(4000, random_state=0).to_dict("records")


def test_every_field_is_written_and_read_back_by_its_entry(rows):
    for r in rows:
        doc, values = row_document(r), row_values(r)
        assert read_row(doc)["values"] == values
        for name, value in values.items():
            f = FIELD[name]
            if value is None:
                assert f"{f.bare_label}: no data" in doc
            else:
                assert f": {value}{f.unit}" in doc
        for f in FIELDS:  # a field missing from the table is written as "no data" or left out, as its entry says
            if r[f.column] != r[f.column]:
                assert (f.name in values) == f.no_data


def test_the_row_format_is_unchanged_by_the_registry():
    # the documents every knowledge base and run of this version was built with
    assert row_format_id() == "4af1cdeb356f6e52"


def test_cues_are_tried_most_specific_first():
    assert [n for n, _ in answer_cues()][:3] == ["ratio", "hs_earnings", "premium"]
    assert [n for n, _ in question_cues()][0] == "premium" and [n for n, _ in question_cues()][-1] == "completers"
    assert grounding.FIELD_CUES == answer_cues()
    assert set(grounding.FIELD_NAMES) == {f.name for f in FIELDS}
    assert all(k.topic in covers() for k in KINDS)


@pytest.mark.parametrize("kind", [k.name for k in KINDS])
def test_each_kind_asks_answers_and_references_its_field(kind, rows):
    spec = KIND[kind]
    pick = [r for r in rows if all(row_values(r).get(f) is not None for f in (spec.field, *spec.needs))]
    r = pick[0]
    sub = next((s for s in spec.subs if (s != "fails") == (not row_values(r)[spec.field].startswith("-"))), kind)
    answer = answer_text(kind, sub, [r], {str(r["row_id"]): 1})
    verdict = grounding.check(answer, [row_document(r)], expected=[1])
    assert verdict["status"] == "verified", verdict["problems"]
    assert any(c["type"] in ("figure", "verdict") and c["field"] in (spec.field, "premium") for c in verdict["claims"])
    ref = reference_for(kind, sub, [r])
    score = score_reply({"kind": kind, **ref}, answer, True, 10)
    assert (score["yes_no_correct"] if spec.score == "verdict" else score["numeric_correct"]) is True
    for template in range(len(spec.questions)):
        assert r["inst_name"] in question_text(kind, sub, [r], template, random.Random(0))


def test_a_completers_figure_is_constrained_and_checked_like_any_other(rows):
    r = next(x for x in rows if x["completers_count"] == x["completers_count"] and 40 <= x["completers_count"] < 99)
    doc = row_document(r)
    right = answer_text("completers", "completers", [r], {str(r["row_id"]): 1})
    count = row_values(r)["completers"]
    wrong = right.replace(f"Completers: {count}", f"Completers: {int(count) + 1}")
    assert grounding.check(right, [doc])["status"] == "verified"
    bad = grounding.check(wrong, [doc])
    assert bad["status"] == "unverified" and "completers" in bad["problems"][0]
    rules = grounding.Rules([doc])
    prefix = right[:right.index("Completers: ") + len("Completers: ")]
    assert rules.admits(prefix, count) and not rules.admits(prefix, str(int(count) + 1))
    # eval: the count, not a citation's number, is the figure
    ref = reference_for("completers", "completers", [r])
    assert score_reply({"kind": "completers", **ref}, wrong, True, 5)["numeric_correct"] is False


def test_completers_missing_is_said_as_no_data_and_checked(rows):
    r = next(x for x in rows if x["completers_count"] != x["completers_count"])
    answer = answer_text("no_data", "completers", [r], {str(r["row_id"]): 1})
    assert "Completers: no data" in answer
    assert grounding.check(answer, [row_document(r)])["status"] == "verified"
    assert reference_for("no_data", "completers", [r])["source"]["suppressed"] == "completers"


@pytest.mark.parametrize("text", [
    "how many students finish the nursing bsn at ohio state?",
    "How many people graduate from the bachelor's in Nursing at Ohio State University-Main Campus?",
    "number of grads in the ohio state nursing bachelors",
])
def test_advise_answers_a_completers_question_about_the_asked_row(text):
    res = resolve_turn(text)
    assert res.field == "completers"
    p = advise.plan([{"role": "user", "content": text}])
    assert p.decision == "answer" and p.kind[1] == "completers"
    row = p.rows[0]
    assert row["inst_name"] == "Ohio State University-Main Campus" and str(row["credential_level"]) == "3"
    template = KIND["completers"].questions[KIND["completers"].model_template]
    assert p.question.startswith(template.split("{")[0]) and row["inst_name"] in p.question
    # the dataset's own answer for the row, as the fallback writes it, is verified against the asked row
    fallback = advise.finish(p, {"grounding": {"fallback": True}})
    assert fallback["grounding"]["status"] == "verified"
    assert f"Completers: {row_values(row)['completers']}" in fallback["text"]
    assert row_names(row["credential_desc"], row["cip_desc"].rstrip("."), row["inst_name"])["full"] in fallback["text"]


def test_a_value_slot_takes_the_rows_value_or_no_data_never_words(rows, smol_tokenizer):
    """Held-out answers wrote "Completers: Seven" and "Completers: one (...)" for a row without completers: no figure,
    so nothing held them. The check refuses words in a field's value slot, and decoding keeps only the row's value
    (or "no data" where it has none) there."""
    from collegeadvisor.generate import GroundedDecoding

    with_count = next(x for x in rows if x["completers_count"] == x["completers_count"] and x["completers_count"] >= 40)
    without = next(x for x in rows if x["completers_count"] != x["completers_count"])
    for r in (with_count, without):
        doc, name = row_document(r), row_names(r["credential_desc"], r["cip_desc"].rstrip("."), r["inst_name"])["full"]
        verdict = grounding.check(f"[1] {name}. Completers: Seven.", [doc])
        assert verdict["status"] == "unverified" and "where row [1]'s completers goes" in verdict["problems"][0]
        text = f"[1] {name}. Completers: "
        rules = grounding.Rules([doc])
        assert rules.value_slot(text) and not rules.value_slot(f"[1] {name}. Graduates")
        banned, keep = GroundedDecoding(smol_tokenizer, [rules], 0)._decide(rules, text)
        kept = {smol_tokenizer.decode([i]).strip().lower() for i in keep}
        assert "seven" not in kept and "one" not in kept
        if r is without:
            assert "no" in kept and not any(k[:1].isdigit() for k in kept)
        else:
            assert "no" not in kept and row_values(r)["completers"][:1] in kept
