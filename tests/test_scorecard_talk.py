"""The dataset's conversations as students write them (data.scorecard_talk): loose wording, follow-ups and the
fixed replies, built on a slice of the real table, each held against its rows and against what advise would do."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from collegeadvisor import advise
from collegeadvisor.data.fields import KINDS, UNCOVERED
from collegeadvisor.data.scorecard import load_table, program_name
from collegeadvisor.data.scorecard_qa import build_scorecard_dataset
from collegeadvisor.data.scorecard_talk import FIXED_MIX, made_up_school, program_forms, school_forms, typo
from collegeadvisor.data.scorecard_text import CREDENTIAL_SLANG, FOLLOW_UPS
from collegeadvisor.grounding import check
from collegeadvisor.kb.resolve import resolve_conversation, resolve_turn

N = 800


@pytest.fixture(scope="module")
def table():
    """One school in 40, and every school of 60 names two schools share (so the ambiguous kind has names)."""
    df = load_table()
    units = df.groupby("inst_name")["unitid"].nunique()
    shared = sorted(units[units == 2].index)[:60]
    return df[df["unitid"].isin(sorted(df["unitid"].unique())[::40]) | df["inst_name"].isin(shared)]


@pytest.fixture(scope="module")
def train(table, tmp_path_factory):
    out = tmp_path_factory.mktemp("talk")
    build_scorecard_dataset(out, n_examples=N, n_heldout=40, seed=0, table=table)
    return [json.loads(line) for line in (out / "scorecard.jsonl").read_text().splitlines()]


def _of(train, kind):
    return [ex for ex in train if ex["kind"] == kind]


def test_every_talk_kind_is_there_and_every_answer_holds_against_its_rows(train):
    for kind, share in FIXED_MIX.items():
        assert 0.5 * share * N <= len(_of(train, kind)) <= share * N + 1, kind
    assert len(_of(train, "follow_up")) > 0.05 * N
    assert sum(bool(ex["source"].get("loose")) for ex in train) > 0.15 * N
    for ex in train:
        for m in ex["messages"]:
            if m["role"] == "assistant":
                assert check(m["content"], ex["context"])["status"] != "unverified", (ex["kind"], m["content"])


def test_loose_questions_resolve_to_the_asked_row(train):
    """Reworded as students type ("uga", "cs bs", a typo), a question still names its row: advise finds it."""
    loose = [ex for ex in train if ex["source"].get("loose") and ex["kind"] != "compare"]
    found = 0
    for ex in loose:
        text = ex["messages"][0]["content"]
        assert text == text.lower() or ex["source"]["school"].lower() not in text  # not the templated wording
        want = {ex["source"]["row_id"], *(r["row_id"] for r in ex["source"].get("rows", []))}
        found += bool(want & {str(r["row_id"]) for r in advise.plan(ex["messages"][:1]).rows})
    assert found >= 0.9 * len(loose)


FOLLOW = [re.escape(t).replace(re.escape("{" + k + "}"), ".+") for k, ts in FOLLOW_UPS.items() for t in ts] + \
    [re.escape(t) for k in KINDS for t in k.follow]


def test_a_follow_up_changes_one_thing_and_is_answered_about_the_row_it_means(train):
    follow = _of(train, "follow_up")
    found = 0
    for ex in follow:
        user = [m for m in ex["messages"] if m["role"] == "user"]
        first, second = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
        assert len(user) == 2 and any(re.fullmatch(f, user[1]["content"]) for f in FOLLOW)  # "and at uga?"
        cited = int(re.match(r"\[(\d)\]", second).group(1))
        src = ex["source"]
        assert ex["context"][cited - 1].startswith(f"{src['school']} (")  # the row the follow-up means
        assert f"{src['credential']} in {src['program']}." in ex["context"][cited - 1]
        assert first != second
        found += ex["source"]["row_id"] in {str(r["row_id"]) for r in advise.plan(user).rows}
    assert found >= 0.8 * len(follow)  # the chain, read over both turns, means the same row


def test_fixed_replies_are_the_ones_advise_gives(train):
    for kind in FIXED_MIX:
        exs = _of(train, kind)
        plans = [advise.plan(ex["messages"][:1]) for ex in exs]
        assert sum(p.decision == kind for p in plans) >= 0.85 * len(exs), kind
        same = sum(p.reply == ex["messages"][1]["content"] for p, ex in zip(plans, exs))
        assert same >= 0.5 * len(exs), kind  # names as written differ at most (apostrophes, "credential")
        assert not any("$" in ex["messages"][1]["content"] for ex in exs)


def test_a_row_the_school_lacks_is_said_missing_and_what_it_lists_is_its_own(train):
    df = load_table()
    for ex in _of(train, "no_row"):
        reply, school = ex["messages"][1]["content"], ex["source"]["school"]
        assert reply.startswith("The College Scorecard has no ") and f" for {school}." in reply
        assert all(doc.startswith(f"{school} (") for doc in ex["context"])
        rows = df[df["unitid"].astype(str) == ex["source"]["unitid"]]
        asked = ex["source"]["asked_program"]
        what = reply.split("has no ", 1)[1].split(" for ")[0]
        listed = {(program_name(r), r["credential_desc"]) for r in rows.to_dict("records")}
        assert not any(p == asked and what.startswith(c.split("'")[0].lower()) for p, c in listed)


def test_made_up_schools_are_no_school_and_ambiguous_names_list_their_schools(train):
    words = {w for name in load_table()["inst_name"].str.lower() for w in re.findall(r"[a-z]+", name)}
    for ex in _of(train, "unknown_school"):
        assert ex["source"]["fake_school"].split()[0].lower() not in words
    for ex in _of(train, "ambiguous"):
        states = re.findall(r"\(([A-Z]{2})\)", ex["messages"][1]["content"])
        assert len(states) == len(set(states)) >= 2 and len(ex["context"]) == len(states)


def test_made_up_names_are_far_from_every_real_one():
    rng = np.random.default_rng(0)
    taken = ["michigan", "quest", "first"]
    for _ in range(50):
        word = made_up_school(rng, taken).split()[0].lower()
        assert word not in ("quest", "first") and not word.startswith(("ques", "firs"))


def test_slang_topics_and_name_forms_are_read_back_by_the_resolver():
    """The words the dataset writes are words the resolver reads: each credential's slang its credential level,
    each uncovered topic's questions that topic, a school's forms that school, a program's forms that program."""
    df = load_table()
    level_of = dict(zip(df["credential_desc"], df["credential_level"].astype(str)))
    for desc, slang in CREDENTIAL_SLANG.items():
        for word in slang:
            res = resolve_turn(f"{word} in economics at university of georgia salary")
            assert res.levels and res.levels[0] == level_of[desc], (desc, word, res.levels)
    for topic in UNCOVERED:
        for q in topic.questions:
            assert resolve_conversation([{"role": "user", "content": q.format(school="ohio state")}]).off_topic \
                == topic.name, q
    assert "u of iowa" in school_forms("University of Iowa") and "penn state" in school_forms(
        "Pennsylvania State University-Main Campus")
    assert {"cs", "computer science"} <= set(program_forms("Computer Science"))
    assert "registered nursing" in program_forms(
        "Registered Nursing, Nursing Administration, Nursing Research and Clinical Nursing")
    rng = np.random.default_rng(1)
    assert all(typo("accounting", rng) != "accounting" for _ in range(10))
