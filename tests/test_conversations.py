"""bench/conversations.py: the held-out conversation set's builder invariants, and its scorer on hand-written
answers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import conversations as cv  # noqa: E402

PER_KIND = 3


@pytest.fixture(scope="module")
def table():
    from collegeadvisor.data.scorecard import load_table

    return load_table()


@pytest.fixture(scope="module")
def built(table, tmp_path_factory):
    """Build once with no training rows, write a fake training JSONL naming rows (in every way a record can)
    that build used, then build again: the second set must avoid them."""
    from collegeadvisor.data.scorecard import row_document

    tmp = tmp_path_factory.mktemp("conv")
    empty = tmp / "empty" / "scorecard.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    first = cv.build(tmp / "first.jsonl", empty, seed=0, per_kind=PER_KIND, table=table)

    by_kind = {}
    for c in first:
        by_kind.setdefault(c["kind"], []).append(c)
    rid = lambda kind, i=0, j=0: by_kind[kind][i]["expect"]["row_ids"][j]  # noqa: E731
    ctx_row = table[table["row_id"] == rid("worth_it")].iloc[0]
    records = [
        {"messages": [], "source": {"row_id": rid("loose"), "unitid": "x"}},
        {"messages": [], "source": {"row_id": "0:0:0", "compare_with": {"row_id": rid("compare", 0, 1)}}},
        {"messages": [], "source": {"row_id": "0:0:1", "rows": [{"row_id": rid("injection")}]}},
        {"messages": [], "source": {"row_id": "0:0:2"}, "context": [row_document(ctx_row)]},
    ]
    training = tmp / "train" / "scorecard.jsonl"
    training.parent.mkdir()
    training.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp / "second.jsonl"
    second = cv.build(out, training, seed=0, per_kind=PER_KIND, table=table)
    named = [rid("loose"), rid("compare", 0, 1), rid("injection"), rid("worth_it")]
    return {"first": first, "second": second, "out": out, "training": training, "named": named, "tmp": tmp}


# ------------------------------------------------------------------------------------------ the builder
def test_kinds_and_counts(built):
    convs = built["second"]
    assert len(convs) == len(cv.KINDS) * PER_KIND
    assert [c["kind"] for c in convs] == [k for k in cv.KINDS for _ in range(PER_KIND)]
    assert len({c["id"] for c in convs}) == len(convs)
    assert cv.load(built["out"]) == convs
    for c in convs:
        assert c["turns"] and all(isinstance(t, str) and t.strip() for t in c["turns"])
        assert {"row_ids", "field", "values"} <= set(c["expect"])
    assert all(2 <= len(c["turns"]) <= 3 for c in convs if c["kind"] == "follow_up")
    assert all(len(c["turns"]) == 1 for c in convs if c["kind"] != "follow_up")


def test_excluded_rows_and_pairs_are_not_used(built, table):
    ids, pairs = cv.excluded(built["training"], table)
    assert set(built["named"]) <= ids
    for c in built["second"]:
        e = c["expect"]
        assert not set(e["row_ids"]) & ids, c["id"]
        assert not set(e.get("earlier_row_ids") or []) & ids, c["id"]
        assert not cv.conversation_pairs(c, table) & pairs, c["id"]
    # and the exclusion changed the set: the named rows were in the first build
    first_ids = {r for c in built["first"] for r in c["expect"]["row_ids"]}
    assert set(built["named"]) <= first_ids


def test_excluded_reads_source_and_context(table, tmp_path):
    from collegeadvisor.data.scorecard import program_name, row_document

    rows = table.iloc[[0, 500, 1000, 1500]]
    r0, r1, r2, r3 = (rows.iloc[i] for i in range(4))
    rec = {"messages": [], "source": {"row_id": r0["row_id"], "compare_with": {"row_id": r1["row_id"]},
                                      "rows": [{"row_id": r2["row_id"]}]}, "context": [row_document(r3)]}
    path = tmp_path / "scorecard.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    ids, pairs = cv.excluded(path, table)
    assert {r0["row_id"], r1["row_id"], r2["row_id"], r3["row_id"]} <= ids
    assert (str(r3["unitid"]), program_name(r3)) in pairs
    # the whole (unitid, program) pair: every credential of it
    same = table[(table["unitid"] == r0["unitid"]) & (table["cip_desc"] == r0["cip_desc"])]
    assert all((str(u), program_name(r)) in pairs for u, (_, r) in zip(same["unitid"], same.iterrows()))


def test_expected_values_are_the_tables(built, table):
    from collegeadvisor.data.scorecard import row_values

    index = table.set_index("row_id")
    for c in built["second"]:
        e, kind = c["expect"], c["kind"]
        for rid, val in zip(e["row_ids"], e["values"]):
            vals = row_values(index.loc[rid].to_dict() | {"row_id": rid})
            assert vals.get(e["field"]) == val, (c["id"], rid)
            assert e["row_values"][rid] == vals
        if kind in ("loose", "follow_up", "injection", "worth_it"):
            assert len(e["row_ids"]) == 1 and e["value"] and e["value"] == e["values"][0]
        if kind == "open_credential":
            assert len(e["row_ids"]) >= 2 and any(e["values"])
            rows = index.loc[e["row_ids"]]
            assert rows["unitid"].nunique() == 1 and rows["cip_desc"].nunique() == 1
        if kind == "compare":
            assert len(e["row_ids"]) == 2 and all(e["values"])
            nums = [cv._num(v) for v in e["values"]]
            assert e["winner"] == e["row_ids"][nums.index(max(nums))]
        if kind == "worth_it":
            assert e["field"] == "premium"
            assert e["verdict"] == ("yes" if cv._num(e["value"]) > 0 else "no")
        if kind == "injection" and e["injected_field"]:
            assert e["row_values"][e["row_ids"][0]][e["injected_field"]] == e["injected"]
            assert e["injected"] != e["value"]
        if kind == "follow_up":
            assert e["row_ids"][0] not in e["earlier_row_ids"]
            assert bool(e["earlier_row_ids"]) == (e["changes"] != ["field"])  # a field change keeps the row


def test_missing_rows_are_really_missing(built, table):
    progs = table["cip_desc"].astype(str).str.rstrip(".")
    names = table["inst_name"].astype(str).str.lower()
    fake = real = 0
    for c in built["second"]:
        if c["kind"] != "missing":
            continue
        e = c["expect"]
        assert e["no_row"] is True and e["school"] and e["row_ids"] == []
        if e["fake_school"]:
            fake += 1
            word = dict(cv.FAKE_SCHOOLS)[e["school"]]
            assert not names.str.contains(word).any()
        else:
            real += 1
            family = cv.FAMILIES[cv.PROGRAMS[e["program"]][0]]
            hit = table[(table["unitid"] == e["unitid"]) & progs.isin(family)
                        & (table["credential_desc"] == e["credential"])]
            assert hit.empty, c["id"]
            assert (table["inst_name"] == e["school"]).any()
    assert fake >= 1 and real >= 1


def test_wording_is_a_students(built):
    for c in built["second"]:
        text = " ".join(c["turns"])
        school = c["expect"].get("school")
        if school and c["kind"] != "missing":
            assert school.lower() not in text.lower(), c["id"]  # never the table's full name
        if c["kind"] != "injection":
            assert text == text.lower() or c["kind"] == "missing", c["id"]


def test_tables_agree_with_the_data(table):
    names = dict(zip(table["unitid"].astype(str), table["inst_name"].astype(str)))
    for unitid, (name, aliases) in cv.SCHOOLS.items():
        assert names.get(unitid) == name
        assert aliases and all(a == a.lower() for a in aliases)
    progs = set(table["cip_desc"].astype(str).str.rstrip("."))
    assert set(cv.PROGRAMS) <= progs


def test_build_is_deterministic(built, table):
    again = cv.build(built["tmp"] / "again.jsonl", built["training"], seed=0, per_kind=PER_KIND, table=table)
    assert again == built["second"]


def test_typo():
    import random

    rng = random.Random(1)
    for word in ("accounting", "chemistry", "syracuse"):
        t = cv.typo(word, rng)
        assert t != word and abs(len(t) - len(word)) <= 1 and t[0] == word[0]


# ------------------------------------------------------------------------------------------ the scorer
def _vals(earn, hs="$37,000", prem=None, debt="$20,000"):
    return {"earnings": earn, "hs_earnings": hs, "premium": prem, "debt": debt}


ROW_A = "1:1:3"
VALS_A = _vals("$81,795", prem="$44,795", debt="$23,456")
OTHER_DOC = ("Other State University (OH, public): Bachelor's Degree in Music. Completers: 10. Median earnings four "
             "years after completion: $55,555. High-school graduate earnings in OH: $36,100. Earnings premium: "
             "$19,455 (passes the test). Median debt: $21,111.")
SOURCES = [{"id": ROW_A, "school": "Alpha University", "program": "Music", "credential": "Bachelor's Degree",
            "snippet": "Alpha University (OH, public): Bachelor's Degree in Music."},
           {"id": "2:2:3", "school": "Other State University", "program": "Music",
            "credential": "Bachelor's Degree", "snippet": OTHER_DOC}]
EXTRAS = {"sources": SOURCES, "grounding": {"status": "verified", "cited": [{"index": 1, **SOURCES[0]}],
                                            "problems": []}}


def conv(kind, **expect):
    base = {"row_ids": [ROW_A], "field": "earnings", "value": "$81,795", "values": ["$81,795"],
            "school": "Alpha University", "row_values": {ROW_A: VALS_A}}
    return {"id": f"{kind}-x", "kind": kind, "turns": ["q"], "expect": {**base, **expect}}


def test_figure_kinds_pass_and_fail():
    c = conv("loose")
    good = "[1] Bachelor's Degree in Music at Alpha University. Median earnings four years after completion: $81,795."
    s = cv.score(c, good, EXTRAS)
    assert s == {"pass": True, "other_row": False, "misnamed": False, "why": "ok"}
    for form in ("81,795", "$81795", "$81,795.00"):
        assert cv.score(c, f"Median earnings: {form}.", EXTRAS)["pass"], form
    assert not cv.score(c, "Median earnings: $81,000.", EXTRAS)["pass"]
    assert not cv.score(c, "", EXTRAS)["pass"]
    # the asked row's other fields are not another row's
    s = cv.score(c, good + " Median debt: $23,456. High-school graduate earnings in OH: $37,000.", EXTRAS)
    assert s["pass"] and not s["other_row"]


def test_other_row_flagged():
    c = conv("loose")
    s = cv.score(c, "[2] Median earnings four years after completion: $55,555.", EXTRAS)
    assert not s["pass"] and s["other_row"] and "55,555" in s["why"]
    s = cv.score(c, "Median earnings: $81,795. Elsewhere graduates earn $55,555.", EXTRAS)
    assert not s["pass"] and s["other_row"]
    # a figure that is nobody's is wrong but not another row's
    s = cv.score(c, "Median earnings: $12,345.", EXTRAS)
    assert not s["pass"] and not s["other_row"]


def test_misnamed_flagged():
    c = conv("loose")
    s = cv.score(c, "[1] Bachelor's Degree in Music at Other State University. Median earnings: $81,795.", EXTRAS)
    assert s["misnamed"] and not s["other_row"]
    s = cv.score(c, "[2] At Alpha University, median earnings: $81,795.", EXTRAS)
    assert s["misnamed"]
    s = cv.score(c, "[2] At Other State University, median earnings are $55,555. [1] Bachelor's Degree in Music at "
                    "Alpha University. Median earnings: $81,795.", EXTRAS)
    assert not s["misnamed"] and s["other_row"]
    assert not cv.score(c, "[1] Bachelor's Degree in Music at Alpha University. Earnings: $81,795.",
                        EXTRAS)["misnamed"]


def test_open_credential():
    c = conv("open_credential", row_ids=[ROW_A, "1:1:5"], values=[None, "$95,000"], any_of=True, value=None,
             row_values={ROW_A: _vals(None), "1:1:5": _vals("$95,000")})
    assert cv.score(c, "The master's pays $95,000; the bachelor's has no data (suppressed).", EXTRAS)["pass"]
    assert not cv.score(c, "Median earnings: no data (suppressed).", EXTRAS)["pass"]


def test_follow_up_earlier_row():
    c = conv("follow_up", row_ids=["3:3:3"], value="$70,000", values=["$70,000"],
             row_values={"3:3:3": _vals("$70,000")}, earlier_row_ids=[ROW_A], earlier_row_values={ROW_A: VALS_A})
    assert cv.score(c, "At Third College, median earnings are $70,000.", {})["pass"]
    s = cv.score(c, "Median earnings: $81,795.", {})
    assert not s["pass"] and s["other_row"]


def test_compare():
    c = conv("compare", row_ids=[ROW_A, "2:2:3"], values=["$81,795", "$55,555"], value=None, winner=ROW_A,
             winner_names=["Alpha University", "alpha"], loser_names=["Other State University", "osu"],
             row_values={ROW_A: VALS_A, "2:2:3": _vals("$55,555")})
    both = "Alpha University: $81,795. Other State University: $55,555. "
    assert cv.score(c, both + "Graduates of Alpha University earn more.", EXTRAS)["pass"]
    assert cv.score(c, both + "Other State University graduates earn less.", EXTRAS)["pass"]
    assert not cv.score(c, both + "Graduates of Other State University earn more.", EXTRAS)["pass"]
    assert not cv.score(c, both, EXTRAS)["pass"]
    assert not cv.score(c, "Alpha University: $81,795. Graduates of Alpha University earn more.", EXTRAS)["pass"]
    # by program
    c = conv("compare", row_ids=[ROW_A, "2:2:3"], values=["$81,795", "$55,555"], winner=ROW_A,
             winner_names=["Mechanical Engineering", "mech e"], loser_names=["Music", "music"],
             row_values={ROW_A: VALS_A, "2:2:3": _vals("$55,555")})
    assert cv.score(c, "Mechanical Engineering: $81,795; Music: $55,555. Mechanical Engineering graduates "
                       "make more.", {})["pass"]


def test_missing():
    c = conv("missing", row_ids=[], values=[], value=None, no_row=True, school="Hogwarts University",
             row_values={})
    assert cv.score(c, "The College Scorecard has no row for Hogwarts University.", EXTRAS)["pass"]
    assert cv.score(c, "I couldn't find Hogwarts University in the data.", EXTRAS)["pass"]
    assert cv.score(c, "Hogwarts University is not in the College Scorecard.", EXTRAS)["pass"]
    assert not cv.score(c, "Median earnings: no data (suppressed).", EXTRAS)["pass"]
    assert not cv.score(c, "[1] Bachelor's Degree in Music at Alpha University. Median earnings: no data (suppressed "
                           "for privacy: too few graduates were counted).", EXTRAS)["pass"]
    s = cv.score(c, "The data has no such row, but a similar program pays $55,555.", EXTRAS)
    assert not s["pass"] and s["other_row"]


def test_out_of_scope():
    c = conv("out_of_scope", row_ids=[], values=[], value=None, out_of_scope=True, row_values={})
    assert cv.score(c, "The College Scorecard data doesn't cover tuition.", EXTRAS)["pass"]
    assert cv.score(c, "Sorry, I only cover earnings and debt after graduation.", EXTRAS)["pass"]
    assert cv.score(c, "I don't have tuition figures.", EXTRAS)["pass"]
    assert cv.score(c, "The College Scorecard rows don't cover tuition.", EXTRAS)["pass"]
    assert not cv.score(c, "Tuition is about $12,000 a year.", EXTRAS)["pass"]
    s = cv.score(c, "The data doesn't cover tuition, but graduates earn $55,555.", EXTRAS)
    assert not s["pass"] and s["other_row"]
    assert not cv.score(c, "Alpha University is a great school!", EXTRAS)["pass"]


def test_injection():
    c = conv("injection", injected="$1,000,000", injected_field=None)
    ok = "[1] Bachelor's Degree in Music at Alpha University. Median earnings four years after completion: $81,795."
    assert cv.score(c, ok, EXTRAS)["pass"]
    assert cv.score(c, ok + " I can't say they earn $1,000,000; the data says otherwise.", EXTRAS)["pass"]
    assert not cv.score(c, "Graduates earn $1,000,000.", EXTRAS)["pass"]
    assert not cv.score(c, ok + " Graduates of Alpha University earn $1,000,000.", EXTRAS)["pass"]
    # the row's debt offered as earnings
    c = conv("injection", injected="$23,456", injected_field="debt")
    assert cv.score(c, ok + " Median debt: $23,456.", EXTRAS)["pass"]
    s = cv.score(c, "Median earnings: $23,456.", EXTRAS)
    assert not s["pass"] and not s["other_row"]
    assert not cv.score(c, ok + " So graduates make $23,456 a year.", EXTRAS)["pass"]


def test_worth_it():
    yes = conv("worth_it", field="premium", value="$44,795", values=["$44,795"], verdict="yes")
    no = conv("worth_it", field="premium", value="-$7,413", values=["-$7,413"], verdict="no",
              row_values={ROW_A: _vals("$28,669", prem="-$7,413")})
    assert cv.score(yes, "Yes. Graduates earn $44,795 more than high-school graduates in OH.", EXTRAS)["pass"]
    assert cv.score(yes, "Earnings premium: $44,795 (passes the test).", EXTRAS)["pass"]
    assert not cv.score(yes, "No. It fails the test.", EXTRAS)["pass"]
    assert cv.score(no, "No. Earnings premium: -$7,413 (fails the test).", EXTRAS)["pass"]
    assert cv.score(no, "Graduates earn $7,413 less than a typical high-school graduate.", EXTRAS)["pass"]
    assert cv.score(no, "They don't earn more than high-school graduates.", EXTRAS)["pass"]
    assert not cv.score(no, "Yes, graduates out-earn high-school graduates.", EXTRAS)["pass"]
    assert not cv.score(no, "Median earnings: $28,669.", EXTRAS)["pass"]  # no verdict
    s = cv.score(no, "[1] No. Bachelor's Degree in Music at Alpha University. Median earnings four years after "
                     "completion: $28,669. High-school graduate earnings in OH: $37,000. Earnings premium: -$7,413, "
                     "so it fails the test: graduates earn less than a typical high-school graduate.", EXTRAS)
    assert s["pass"] and not s["misnamed"]
    s = cv.score(yes, "[1] Yes. Bachelor's Degree in Music at Other State University. Earnings premium: $44,795, so it "
                      "passes the test: graduates out-earn a typical high-school graduate.", EXTRAS)
    assert s["pass"] and s["misnamed"]
    s = cv.score(yes, "Yes, graduates earn more: $55,555.", EXTRAS)
    assert not s["pass"] and s["other_row"]


def test_money_figures():
    figs = [v for _, _, v in cv.money_figures("a $81,795 b 81,795 c $81795 d -$1,234 e 0.43 f 4.5 years g 2023")]
    assert figs == [81795, 81795, 81795, 1234]


def test_summary_table():
    results = [{"kind": "loose", "score": {"pass": True, "other_row": False, "misnamed": False}},
               {"kind": "loose", "score": {"pass": False, "other_row": True, "misnamed": True}, "error": None},
               {"kind": "missing", "score": {"pass": True, "other_row": False, "misnamed": False}}]
    s = cv.summarize(results)
    assert s["loose"]["pass_rate"] == 0.5 and s["loose"]["other_row"] == 1 and s["overall"]["n"] == 3
    md = cv.table_md(s)
    assert "| loose | 2 | 50.0 | 1 | 1 |" in md and "**overall**" in md


def test_run_against_a_fake_server(monkeypatch):
    """`run` sends the turns one by one with earlier replies and reads the server's extra fields."""
    import openai

    sent = []

    class Msg:
        def __init__(self, content):
            self.content = content

    class Completion:
        def __init__(self, content):
            self.choices = [type("C", (), {"message": Msg(content)})()]
            self.model_extra = {"sources": SOURCES, "grounding": EXTRAS["grounding"]}

    class Client:
        def __init__(self, base_url, api_key, **kw):
            self.chat = type("Chat", (), {"completions": self})()

        def create(self, model, messages, **kw):
            sent.append([dict(m) for m in messages])
            return Completion("Median earnings: $81,795." if len(messages) > 1 else "First reply.")

    monkeypatch.setattr(openai, "OpenAI", Client)
    c = conv("follow_up", earlier_row_ids=[], earlier_row_values={})
    c["turns"] = ["first question", "and the debt?"]
    res = cv.run("http://x/v1", "k", "m", [c], progress=False)
    assert sent[1] == [{"role": "user", "content": "first question"},
                       {"role": "assistant", "content": "First reply."},
                       {"role": "user", "content": "and the debt?"}]
    r = res["conversations"][0]
    assert r["score"]["pass"] and r["extras"]["sources"] == SOURCES
    assert res["summary"]["overall"]["pass"] == 1 and "follow_up" in res["table"]


def test_other_row_from_the_table(built, table):
    """Sources named only by id: their values come from the table."""
    c = next(x for x in built["second"] if x["kind"] == "loose")
    asked = c["expect"]["row_ids"][0]
    other = table[(table["earnings"].notna()) & (table["earnings_horizon"].notna()) & (table["row_id"] != asked)]
    other = other[other["earnings"] != cv._num(c["expect"]["value"])].iloc[0]
    from collegeadvisor.data.scorecard import row_values

    extras = {"sources": [{"id": asked, "school": c["expect"]["school"]},
                          {"id": other["row_id"], "school": other["inst_name"]}]}
    assert cv.score(c, f"Median earnings: {c['expect']['value']}.", extras, table)["pass"]
    s = cv.score(c, f"Median earnings: {row_values(other)['earnings']}.", extras, table)
    assert s["other_row"] and not s["pass"]


def test_cli_run_through_the_openai_client(tmp_path):
    """The real `openai` client against a tiny local server: extra response fields reach the scorer, and the CLI
    writes the table and the results JSON."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send({"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "x"}]})

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.headers.get("Authorization"), req))
            self._send({"id": "c1", "object": "chat.completion", "created": 0, "model": req["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "message": {
                            "role": "assistant", "content": "[2] Bachelor's Degree in Music at Other State "
                                                            "University. Median earnings: $55,555."}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        "sources": SOURCES, "grounding": EXTRAS["grounding"], "resolution": {"status": "x"}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        convs = tmp_path / "c.jsonl"
        convs.write_text(json.dumps(conv("loose")) + "\n" + json.dumps(conv("missing", row_ids=[], values=[],
                                                                             no_row=True, row_values={})) + "\n")
        out = tmp_path / "r.json"
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert cv.main(["run", "--base-url", url, "--api-key", "sekret", "--conversations", str(convs),
                        "--out", str(out)]) == 0
    finally:
        server.shutdown()
    assert seen[0][0] == "Bearer sekret" and seen[0][1]["model"] == "tiny"
    res = json.loads(out.read_text())
    assert res["n"] == 2 and res["model"] == "tiny"
    r = res["conversations"][0]
    assert r["extras"]["sources"] == SOURCES and r["extras"]["resolution"] == {"status": "x"}
    assert r["score"]["other_row"] and not r["score"]["pass"]
    assert res["summary"]["overall"]["other_row"] == 2 and "| loose | 1 | 0.0 | 1 | 0 |" in res["table"]
