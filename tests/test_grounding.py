"""Grounding: claims read from answers and checked against the cited row; decoding that can't state a figure the
rows don't hold; one path (generate.answer) that checks, retries and falls back."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor

from collegeadvisor import grounding
from collegeadvisor.data.scorecard import load_table, read_row, row_document, row_values
from collegeadvisor.generate import GroundedDecoding, answer, generate
from collegeadvisor.grounding import Rules, check, claims


@pytest.fixture(scope="module")
def rows():
    """A passing row, a failing row and a suppressed row of the real table, as documents."""
    df = load_table()
    earn = df["earnings"].notna() & df["earnings_threshold_state"].notna() & df["debt_median"].notna()
    passing = df[earn & (df["earnings_premium_state"] > 0)].iloc[3]
    failing = df[earn & (df["earnings_premium_state"] < 0)].iloc[3]
    suppressed = df[df["earnings"].isna() & df["debt_median"].isna()].iloc[3]
    return [row_document(r) for r in (passing, failing, suppressed)], [row_values(r) for r in (passing, failing, suppressed)]


def test_read_row_round_trips_every_field():
    df = load_table().sample(3000, random_state=1)
    for r in df.to_dict("records"):
        back = read_row(row_document(r))
        assert back["values"] == row_values(r) and back["school"] == r["inst_name"]
    assert read_row("A passage of a user's own notes: tuition was $12,000.") is None


def _name(doc: str) -> str:
    """The full name an answer gives a row after its citation ("Bachelor's Degree in X at Y.")."""
    return grounding.row_names(read_row(doc))[0]


def test_check_accepts_the_rows_own_figures(rows):
    docs, vals = rows
    good = (f"[1] Yes. {_name(docs[0])} Median earnings four years after completion: {vals[0]['earnings']}. "
            f"High-school graduate earnings in XX: {vals[0]['hs_earnings']}. Earnings premium: {vals[0]['premium']}.")
    verdict = check(good, docs)
    assert verdict["status"] == "verified" and verdict["cited"] == [1]
    assert [c["field"] for c in verdict["claims"] if c["type"] == "figure"] == ["earnings", "hs_earnings", "premium"]
    assert check(f"[3] {_name(docs[2])} Median earnings: no data ({'suppressed'}).", docs)["status"] == "verified"


def test_check_catches_wrong_figure_wrong_field_wrong_verdict_and_invented(rows):
    docs, vals = rows
    one, two, three = (f"[{i}] {_name(d)}" for i, d in enumerate(docs, 1))
    wrong = check(f"{one} Median earnings four years after completion: $12,345.", docs)
    assert wrong["status"] == "unverified" and "median earnings" in wrong["problems"][0]
    # a figure that is in the context, but under another field: the high-school figure stated as earnings
    field = check(f"{one} Median earnings four years after completion: {vals[0]['hs_earnings']}.", docs)
    assert field["status"] == "unverified"
    assert check(f"{one} Median debt: {vals[0]['debt']}.", docs)["status"] == "verified"
    verdict = check(f"[2] Yes. {_name(docs[1])} Earnings premium: {vals[1]['premium']}.", docs)
    assert verdict["status"] == "unverified" and "fails" in verdict["problems"][0]
    assert check(f"[1] Unknown. {_name(docs[0])}", docs)["problems"][0].endswith("has an earnings premium")
    assert check(f"[3] Unknown. {_name(docs[2])} Median earnings: no data.", docs)["status"] == "verified"
    late = check(f"{two} Earnings premium: {vals[1]['premium']}, so it passes the test.", docs)
    assert late["status"] == "unverified" and "fails the test" in late["problems"][0]
    assert check(f"{two} Earnings premium: {vals[1]['premium']}, so it fails the test.", docs)["status"] == "verified"
    invented = check(f"{three} Median earnings: $48,000.", docs)
    assert invented["status"] == "unverified" and "suppressed" in invented["problems"][0]
    abstain = check(f"{one} Median debt: no data.", docs)
    assert abstain["status"] == "unverified" and "says no data" in abstain["problems"][0]
    assert check("[7] Median debt: $5,000.", docs)["problems"][0].startswith("cites [7]")


def test_check_catches_a_row_quoted_under_another_rows_name():
    """The reading error that figure checks can't see: "[2] Master's Degree ..." where [2] is the bachelor's row.
    The figure is [2]'s, so it agrees with its citation, but the text gives it to the master's."""
    df = load_table()
    earned = df[df["earnings"].notna()]
    program = earned["unitid"].astype(str) + ":" + earned["cip_code"].astype(str)
    shared = earned[program.duplicated(keep=False)]  # one school's program at two or more credentials
    two = shared[program[shared.index] == program[shared.index[0]]].iloc[:2]
    docs = [row_document(r) for _, r in two.iterrows()]
    first, second = (read_row(d) for d in docs)
    name = lambda r: f"{r['credential']} in {r['program']} at {r['school']}"  # noqa: E731
    said = f"Median earnings: {second['values']['earnings']}."
    misnamed = check(f"[2] {name(first)}. {said}", docs)
    assert misnamed["status"] == "unverified"
    assert misnamed["problems"] == [f"cites [2] but names row [1] ({name(first)})"]
    assert grounding.forbidden(misnamed)["rows"] == [2]  # a retry may not cite [2] again
    assert check(f"[2] {name(second)}. {said}", docs)["status"] == "verified"
    assert check(f"[2] No. {name(first)}. {said}", docs)["problems"][-1].startswith("cites [2] but names row [1]")
    short = check(f"[1] {name(first)}. [2] {first['credential']}. {said}", docs)  # an open question's form
    assert short["problems"] == [f"cites [2] but names row [1] ({first['credential']})"]
    assert check(f"[1] {name(first)}. [2] {second['credential']}. {said}", docs)["status"] == "verified"
    # a citation must be followed by its row's name: "Graduates of this program" names no row
    nameless = check("[2] Graduates of this program earn more. " + said, docs)
    assert nameless["status"] == "unverified" and nameless["problems"][0].startswith("cites [2] but names it")


def test_every_training_answer_passes_the_check(tmp_path):
    from collegeadvisor.data.scorecard_qa import build_scorecard_dataset

    table = load_table()
    table = table[table["unitid"].isin(sorted(table["unitid"].unique())[::25])]
    build_scorecard_dataset(tmp_path, n_examples=600, n_heldout=60, table=table)
    statuses = set()
    for line in (tmp_path / "scorecard.jsonl").read_text().splitlines():
        ex = json.loads(line)
        verdict = check(ex["messages"][1]["content"], ex["context"])
        assert verdict["status"] != "unverified", (ex, verdict)
        statuses.add(verdict["status"])
    assert statuses == {"verified", "no_claims"}


def test_rules_admit_only_the_cited_rows_value_for_the_field(rows):
    docs, vals = rows
    rules = Rules(docs)
    slot = "[1] Some program. Median earnings four years after completion: "
    earnings = vals[0]["earnings"]
    assert rules.admits(slot, " $") and rules.admits(slot + "$", earnings[1])
    wrong_digit = "1" if earnings[1] != "1" else "2"
    assert not rules.admits(slot + "$", wrong_digit)
    # the debt figure is in the context, but not as earnings
    assert not rules.admits(slot + vals[0]["debt"][:-1], vals[0]["debt"][-1]) or vals[0]["debt"] == earnings
    # a figure may not end before it is complete, and may end once it is
    assert not rules.admits(slot + earnings[:3], ".") and rules.admits(slot + earnings, ".")
    # suppressed: no figure at all, and "no data" is admitted; false "no data" is not
    suppressed = "[3] A certificate. Median earnings: "
    assert not rules.admits(suppressed, " $") and not rules.admits(suppressed, "4")
    assert rules.admits(suppressed, " no") and not rules.admits("[1] x. Median debt: ", " no")
    # yes/no follows the cited row's premium; no yes/no on a suppressed row; only retrieved rows are cited
    assert rules.admits("[1] ", "Yes") and not rules.admits("[1] ", "No")
    assert rules.admits("[2] ", "No") and not rules.admits("[2] ", "Yes")
    assert not rules.admits("[3] ", "Yes") and not rules.admits("[3] ", "No") and rules.admits("[3] ", "Unknown")
    assert not rules.admits("[1] ", "Unknown") and not rules.admits("[2] ", " Unknown")
    assert rules.admits("[", "2") and not rules.admits("[", "4")
    # the verdict after the figures follows the cited row's premium too
    assert rules.admits("[2] x. Earnings premium: -$5, so it", " fails")
    assert not rules.admits("[2] x. Earnings premium: -$5, so it", " passes")
    assert not rules.admits("[3] x. Median earnings: no data, so it", " passes")
    # small numbers are not figures ("[1]", "4 years"); before any citation, no figure at all
    assert rules.admits("It takes ", "4") and not rules.admits("Before citing: ", "$")
    assert not rules.admits("Before citing: $", earnings[1]) and not rules.admits("Before citing: 12", "3")


class _Bias(LogitsProcessor):
    """Pushes a model hard towards writing 9s: "999..." is a figure that is in no passage."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, input_ids, scores):
        scores[:, self.ids] += 40.0
        return scores


def _biased_generate(model, tok, convs, passages, grounded: bool) -> list[str]:
    from collegeadvisor.chat_format import encode_prompt
    from collegeadvisor.generate import gen_kwargs, left_pad

    ids = [i for t, i in tok.get_vocab().items() if tok.convert_tokens_to_string([t]).strip() == "9"]
    prompts = [encode_prompt(tok, grounding_conversation(c, p)) for c, p in zip(convs, passages)]
    input_ids, mask = left_pad(prompts, tok.pad_token_id)
    procs = [_Bias(ids)]
    if grounded:
        procs.append(GroundedDecoding(tok, [Rules(p) for p in passages], input_ids.shape[1]))
    out = model.generate(input_ids=input_ids, attention_mask=mask, logits_processor=procs,
                         **gen_kwargs(tok, 40))
    return [tok.decode(row[input_ids.shape[1]:], skip_special_tokens=True) for row in out]


def grounding_conversation(messages, passages):
    from collegeadvisor.chat_format import with_context

    return with_context(messages, passages)


def test_a_model_biased_towards_a_wrong_figure_still_writes_only_context_figures(tiny_model, rows):
    from transformers import AutoTokenizer

    docs, _ = rows
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    convs = [[{"role": "user", "content": "How much do graduates earn?"}]] * 3
    passages = [docs[:2], docs[1:], docs]
    free = _biased_generate(model, tok, convs, passages, grounded=False)
    assert all("999" in t for t in free)  # the bias works: unconstrained, it writes a figure no row holds
    held = {f.text.strip() for d in docs for f in grounding.figures(d) if f.counts}
    for text in _biased_generate(model, tok, convs, passages, grounded=True):
        for f in grounding.figures(text):
            if f.counts:
                assert any(grounding.same_value(f.value, h) for h in held), (text, held)


def test_answer_retries_then_falls_back_to_the_row(smol_tiny_model, rows, monkeypatch):
    """A reply that fails its check is generated again with the claim forbidden, then replaced by the row."""
    from transformers import AutoTokenizer

    import collegeadvisor.generate as gen

    docs, vals = rows
    tok = AutoTokenizer.from_pretrained(smol_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(smol_tiny_model).eval()
    calls = []

    def fake_generate(model, tokenizer, conversations, passages=None, forbid=None, **kw):
        calls.append(forbid)
        return [{"text": "[1] x. Median debt: no data.", "ids": [], "stopped": True, "n_tokens": 5}
                for _ in conversations]

    monkeypatch.setattr(gen, "generate", fake_generate)
    out = answer(model, tok, [[{"role": "user", "content": "debt?"}]], [docs])[0]
    assert len(calls) == 3 and calls[0] is None and calls[1][0]["no_data"] == ["debt"]
    assert out["raw_grounding"]["status"] == "unverified"
    assert out["grounding"]["fallback"] and out["grounding"]["status"] == "verified"
    assert docs[0].strip() in out["text"] and "[1]" in out["text"]


def test_generate_constrains_every_row_of_a_batch(smol_tiny_model, rows):
    from transformers import AutoTokenizer

    docs, _ = rows
    tok = AutoTokenizer.from_pretrained(smol_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(smol_tiny_model).eval()
    torch.manual_seed(0)
    convs = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    out = generate(model, tok, convs, max_new_tokens=24, passages=[docs, None, docs[:1], docs], temperature=1.0)
    held = {f.text.strip() for d in docs for f in grounding.figures(d) if f.counts}
    for i, r in enumerate(out):
        if i == 1:
            continue
        for f in grounding.figures(r["text"]):
            assert not f.counts or any(grounding.same_value(f.value, h) for h in held)
    assert claims("[1] Yes. Earnings premium: $5.")[0]["type"] == "verdict"


@pytest.fixture
def decoding_spy(monkeypatch):
    """Counts the steps GroundedDecoding runs, wherever generation happens."""
    import collegeadvisor.generate as gen

    steps = []

    class Spy(gen.GroundedDecoding):
        def __call__(self, input_ids, scores):
            steps.append(len(self.rules))
            return super().__call__(input_ids, scores)

    monkeypatch.setattr(gen, "GroundedDecoding", Spy)
    return steps


def _hits(docs):
    return [{"id": f"r{i}", "document": d, "metadata": {"school": "S"}} for i, d in enumerate(docs, 1)]


def test_chat_and_serve_go_through_the_constrained_path(smol_tiny_model, rows, decoding_spy):
    import io

    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from collegeadvisor.chat import chat_loop
    from collegeadvisor.serve.app import create_app

    docs, _ = rows
    tok = AutoTokenizer.from_pretrained(smol_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(smol_tiny_model).eval()
    out = io.StringIO()
    assert chat_loop(model, tok, io.StringIO("How much do graduates earn?\n"), out, max_new_tokens=6,
                     retriever=lambda q: _hits(docs)) == 1
    assert decoding_spy and "(" in out.getvalue()  # the verdict line follows the answer
    chat_steps = len(decoding_spy)
    manifest = {"run_dir": "/tmp/tiny"}
    with TestClient(create_app(model, tok, manifest, retriever=lambda q: _hits(docs))) as client:
        body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Debt?"}],
                                                         "max_tokens": 6}).json()
    assert len(decoding_spy) > chat_steps
    assert body["grounding"]["status"] in ("verified", "no_claims", "unverified", "unresolved")
    assert [s["id"] for s in body["sources"]] == ["r1", "r2", "r3"]


def test_a_reply_cut_by_the_token_budget_loses_its_partial_figure(rows):
    from collegeadvisor.generate import _finish

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "[1] Some program. Median earnings four years after completion: $3"

    docs, _ = rows
    cut = _finish(Tok(), [5, 6, 7], stops=[2], rules=Rules(docs))
    assert cut["text"] == "[1] Some program. Median earnings four years after completion:" and not cut["stopped"]
    assert _finish(Tok(), [5, 6, 7], stops=[2])["text"].endswith("$3")  # without rows, nothing to cut against


# ------------------------------------------------------------------------------------------ hand-made rows
def hand_row(school: str, credential: str, program: str, earnings: float | None, hs: float = 30000.0,
             debt: float = 20000.0) -> dict:
    """A Scorecard table row as `row_document` reads it (no table load)."""
    return {"row_id": f"{school}:{program}:{credential}", "unitid": school, "inst_name": school, "state": "CO",
            "control": "Public", "cip_desc": program + ".", "credential_desc": credential, "completers_count": 120.0,
            "earnings": earnings, "earnings_horizon": "4yr_after_completion" if earnings else None,
            "earnings_threshold_state": hs, "earnings_premium_state": earnings - hs if earnings else None,
            "debt_median": debt, "debt_to_earnings_ratio": round(debt / earnings, 2) if earnings else None,
            "debt_payback_years": None}


BOULDER_BA = hand_row("University of Colorado Boulder", "Bachelor's Degree", "Computer Science", 78922.0)
BOULDER_MA = hand_row("University of Colorado Boulder", "Master's Degree", "Computer Science", 98000.0)
# its earnings premium, $28,922, is the figure the user's "[I]" answer gave as another row's earnings
CSU_BA = hand_row("Colorado State University-Fort Collins", "Bachelor's Degree", "Computer Science", 58922.0)
UGA_BA = hand_row("University of Georgia", "Bachelor's Degree", "Computer Science", 71000.0)
GT_BA = hand_row("Georgia Institute of Technology-Main Campus", "Bachelor's Degree", "Computer Science", 95000.0)
EARN = "Median earnings four years after completion"


@pytest.fixture
def colorado():
    return [row_document(r) for r in (BOULDER_BA, BOULDER_MA, CSU_BA)]


def test_the_users_roman_numeral_answer_is_not_verified(colorado):
    """"[I]" is no citation: its figure ($28,922, another row's earnings premium) cites nothing."""
    said = (f"[I] Bachelor's Degree in Computer Science at University of Colorado at Boulder. {EARN}: $28,922. "
            f"[II] Master's Degree. {EARN}: $98,000.")
    verdict = check(said, colorado)
    assert verdict["status"] == "unverified" and verdict["cited"] == []
    assert verdict["problems"] == ["states $28,922 without citing its row", "states $98,000 without citing its row"]
    # cited, the name it gives belongs to no retrieved row
    named = check(said.replace("[I]", "[1]").replace("$28,922", "$78,922").replace("[II]", "[2]"), colorado)
    assert named["problems"] == ["cites [1] but names it 'Bachelor's Degree in Computer Science at University of "
                                 "Color' (row [1] is Bachelor's Degree in Computer Science at University of Colorado "
                                 "Boulder)"]  # what it says: up to its first period, at most 60 characters
    right = said.replace("[I]", "[1]").replace("$28,922", "$78,922").replace("[II]", "[2]").replace(" at Boulder",
                                                                                                     " Boulder")
    assert check(right, colorado)["status"] == "verified"


@pytest.mark.parametrize("form", ["[I]", "(1)", "[a]", "[1a]", "[]", "[123]", "{1}", "1."])
def test_a_pseudo_citation_carries_no_figure(colorado, form):
    name = grounding.row_names(read_row(colorado[0]))[0]
    verdict = check(f"{form} {name} {EARN}: $78,922.", colorado)
    assert verdict["status"] == "unverified" and "without citing its row" in verdict["problems"][-1]
    assert check(f"[1] {name} {EARN}: $78,922.", colorado)["status"] == "verified"
    # after a real citation, a pseudo-citation ends it: the figure after "(2)" cites nothing
    later = f"[1] {name} {EARN}: $78,922.\n{form} Master's Degree. {EARN}: $98,000."
    assert check(later, colorado)["problems"] == ["states $98,000 without citing its row"]
    assert check(later.replace(form, "[2]"), colorado)["status"] == "verified"


def test_a_name_after_a_citation_must_be_the_rows(colorado):
    docs = [row_document(UGA_BA), row_document(GT_BA)]
    tech = check(f"[1] Computer Science at Georgia Tech. {EARN}: $71,000.", docs)
    assert tech["status"] == "unverified"
    assert tech["problems"] == ["cites [1] but names it 'Computer Science at Georgia Tech' (row [1] is Bachelor's "
                                "Degree in Computer Science at University of Georgia)"]
    other = check(f"[1] Bachelor's Degree in Computer Science at Georgia Institute of Technology-Main Campus. "
                  f"{EARN}: $71,000.", docs)  # another retrieved row's name: the specific message
    assert other["problems"] == ["cites [1] but names row [2] (Bachelor's Degree in Computer Science at Georgia "
                                 "Institute of Technology-Main Campus)"]
    assert check(f"[1] No. {EARN}: $71,000.", docs)["problems"][-1].startswith("cites [1] but names it")
    # every form the dataset names a row by
    row = read_row(colorado[2])
    assert grounding.row_names(row) == (
        "Bachelor's Degree in Computer Science at Colorado State University-Fort Collins.", "Bachelor's Degree.",
        "At Colorado State University-Fort Collins,", "Bachelor's Degree in Computer Science,")
    for name in grounding.row_names(row):
        assert check(f"[3] {name} {EARN.lower()}: $58,922.", colorado)["status"] == "verified", name


def _answer(kind, sub, recs, order):
    from collegeadvisor.data.scorecard_answers import answer_text

    return answer_text(kind, sub, recs, {r["row_id"]: order.index(r) + 1 for r in recs})


def test_a_comparisons_winner_must_be_the_row_that_earns_more():
    schools = [BOULDER_BA, CSU_BA]
    docs = [row_document(r) for r in schools]
    said = _answer("compare", "schools", [CSU_BA, BOULDER_BA], schools)
    assert said.endswith("Graduates of University of Colorado Boulder earn more.")
    assert check(said, docs)["status"] == "verified"
    wrong = check(said.replace("Graduates of University of Colorado Boulder", "Graduates of Colorado State "
                                                                              "University-Fort Collins"), docs)
    assert wrong["status"] == "unverified" and "has the higher median earnings ($78,922)" in wrong["problems"][0]
    nobody = check(said.replace("University of Colorado Boulder earn", "Harvard University earn"), docs)
    assert nobody["problems"] == ["says 'Graduates of Harvard University earn more', which names none of the cited "
                                  "rows"]
    programs = [BOULDER_BA, BOULDER_MA]
    docs = [row_document(r) for r in programs]
    said = _answer("compare", "programs", programs, programs)
    assert said.endswith("The Master's Degree in Computer Science pays more.")
    assert check(said, docs)["status"] == "verified"
    flipped = check(said.replace("The Master's Degree in", "The Bachelor's Degree in"), docs)
    assert flipped["status"] == "unverified" and "row [2]" in flipped["problems"][0]
    # a row without earnings can't win or lose
    unearned = hand_row("University of Colorado Boulder", "Doctoral Degree", "Computer Science", None)
    docs = [row_document(BOULDER_BA), row_document(unearned)]
    claim = (f"[1] Bachelor's Degree in Computer Science at University of Colorado Boulder. {EARN}: $78,922. "
             "[2] Doctoral Degree in Computer Science, median earnings: no data. "
             "The Bachelor's Degree in Computer Science pays more.")
    assert check(claim, docs)["problems"] == ["says 'The Bachelor's Degree in Computer Science pays more', but row "
                                              "[2] has no median earnings"]


def test_the_cited_rows_must_be_the_rows_asked_about(colorado):
    second = f"[2] Master's Degree in Computer Science at University of Colorado Boulder. {EARN}: $98,000."
    assert check(second, colorado)["status"] == "verified"
    assert check(second, colorado, expected={2})["status"] == "verified"
    asked = check(second, colorado, expected={1})
    assert asked["status"] == "unverified"
    assert asked["problems"][0] == ("cites [2] (Master's Degree in Computer Science at University of Colorado "
                                    "Boulder), which is not the row asked about")
    assert asked["problems"][-1] == "cites none of the rows asked about ([1])"
    assert grounding.forbidden(asked)["rows"] == [2]
    notes = colorado[:1] + ["A passage of a user's own notes: tuition was $12,000."]
    assert check("[2] Tuition was $12,000.", notes)["status"] == "verified"
    assert check("[2] Tuition was $12,000.", notes, expected=[1])["problems"] == [
        "cites none of the rows asked about ([1])"]
    assert check("Name a school and a program.", colorado, expected={1})["status"] == "no_claims"
    # decoding: no citation of a row outside `expected` (a passage that is no Scorecard row stays citable)
    rules = Rules(colorado, expected={1})
    assert rules.admits("[", "1") and not rules.admits("[", "2") and not rules.admits("", "[2]")
    assert Rules(notes, expected={1}).admits("[", "2")
    # the fallback quotes a row asked about, under its name, and passes the check
    text = grounding.fallback_answer(colorado, [2], expected={1})
    assert "[1] Bachelor's Degree in Computer Science at University of Colorado Boulder. " in text
    assert check(text, colorado, expected={1})["status"] == "verified"
    assert "[2] Master's" in grounding.fallback_answer(colorado, [2])


def test_answer_checks_retries_and_falls_back_against_the_rows_asked_about(smol_tiny_model, colorado, monkeypatch):
    from transformers import AutoTokenizer

    import collegeadvisor.generate as gen

    tok = AutoTokenizer.from_pretrained(smol_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(smol_tiny_model).eval()
    seen = []

    def fake_generate(model, tokenizer, conversations, passages=None, forbid=None, expected=None, **kw):
        seen.append(expected)
        return [{"text": f"[2] Master's Degree. {EARN}: $98,000.", "ids": [], "stopped": True, "n_tokens": 9}
                for _ in conversations]

    monkeypatch.setattr(gen, "generate", fake_generate)
    out = answer(model, tok, [[{"role": "user", "content": "bachelor's?"}]], [colorado], expected=[[1]])[0]
    assert seen == [[[1]]] * 3
    assert "not the row asked about" in out["raw_grounding"]["problems"][0]
    assert out["grounding"]["fallback"] and out["grounding"]["status"] == "verified"
    assert out["grounding"]["cited"] == [1]
    free = answer(model, tok, [[{"role": "user", "content": "master's?"}]], [colorado])[0]
    assert free["grounding"]["status"] == "verified" and not free["grounding"].get("fallback")


def test_rules_refuse_any_bracket_but_a_citation(colorado):
    rules = Rules(colorado)
    for text in ("", "Median earnings ", "[1] Bachelor's Degree. "):
        for piece in ("[I", "[a", "[1a", "[]", "[123", "[4]", " [I]"):
            assert not rules.admits(text, piece), (text, piece)
        assert rules.admits(text, "[1]") and rules.admits(text, " [") and rules.admits(text, "[3")
    assert not rules.admits("[", "I") and not rules.admits("[", "a") and not rules.admits("[", "]")
    assert not rules.admits("[1", "a") and not rules.admits("[1", "2") and not rules.admits("[1", " ]")
    assert rules.admits("[", "1") and rules.admits("[1", "]") and rules.admits("[1", "] Bachelor")
    assert not rules.admits("[1", "] Master")
    assert not rules.admits("[I", "]")  # a bracket the piece writes into, opened before it
    many = Rules(colorado * 4)  # 12 rows: two-digit citations
    assert many.admits("[1", "2") and many.admits("[12", "]") and not many.admits("[1", "3")
    assert not Rules(colorado, forbid={"rows": [1]}).admits("[", "1")
    # decoding asks once per signature: texts with "[" are told apart by what they write
    assert len({grounding.signature(p) for p in ("[I", "[1", " [", "[:", "[4", "[]")}) == 6


def test_rules_hold_the_name_after_a_citation_to_the_cited_row(colorado):
    rules = Rules(colorado)
    assert rules.admits("[1]", " Bachelor") and rules.admits("[1]", " Yes") and rules.admits("[1] ", "Yes")
    assert not rules.admits("[1]", " Master") and not rules.admits("[1]", " No") and not rules.admits("[1]", "Bach")
    assert not rules.admits("[1]", " Computer") and not rules.admits("[1]", ".") and not rules.admits("[1]", " $")
    assert rules.admits("[1] Yes.", " Bachelor") and not rules.admits("[1] Yes.", " Computer")
    at = "[1] Bachelor's Degree in Computer Science at"
    assert rules.admits(at, " University") and not rules.admits(at, " Colorado") and not rules.admits(at, " Georgia")
    assert rules.name_slot(at) == [" University of Colorado Boulder."]
    assert rules.decision_key("[1]") is None and rules.decision_key(at) is None
    done = "[1] Bachelor's Degree."
    assert rules.name_slot(done) is None and rules.admits(done, " Median") and rules.decision_key(done) is not None
    assert rules.admits(done + " Median earnings: $78,922. [3]", " At") and not rules.admits(done + " x [3]", " Yes")
    assert rules.admits(done + " x [3] At", " Colorado") and not rules.admits(done + " x [3] At", " University")
    assert rules.admits("[2]", " Master") and not rules.admits("[2]", " Bachelor")
    notes = Rules(["A passage of a user's own notes: tuition was $12,000."])
    assert notes.name_slot("[1]") is None and notes.admits("[1]", " Tuition")  # no Scorecard row, no name to hold


def test_the_in_a_school_name_is_no_comparison_winner():
    """"... at The Rockefeller University ... whether it pays more" is a premium answer, not a winner sentence."""
    from collegeadvisor.grounding import check

    doc = ("The Rockefeller University (NY, private, nonprofit): Doctoral Degree in Biology, General. Median "
           "earnings: no data (suppressed). Earnings premium: no data. Median debt: no data.")
    answer = ("[1] Unknown. Doctoral Degree in Biology, General at The Rockefeller University. Median earnings: no data "
              "(suppressed for privacy: too few graduates were counted), so the Scorecard can't tell whether it pays "
              "more than a high-school diploma.")
    verdict = check(answer, [doc])
    assert verdict["status"] == "verified" and not any(c["type"] == "winner" for c in verdict["claims"])


def test_the_reason_after_no_data_is_the_rows_own(rows):
    """After a value slot's "no data (", decoding holds the reason to the row's (`no_data_note`), and the check
    refuses another: "suppressed for privacy: no school is counted" is no reason this row gives."""
    from collegeadvisor.data.scorecard_answers import no_data_note
    from collegeadvisor.data.scorecard_text import SUPPRESSED

    docs, values = rows
    ctx = [docs[2], docs[0]]  # the suppressed row first, then one with every figure
    name = read_row(docs[2])
    head = f"[1] {name['credential']} in {name['program']} at {name['school']}."
    rules = Rules(ctx)
    at = head + " Median earnings: no data ("
    assert rules.name_slot(at) == [SUPPRESSED + ")"] and rules.decision_key(at) is None
    assert rules.admits(at, "supp") and not rules.admits(at, "no") and not rules.admits(at + "suppressed for privacy:", " no")
    assert rules.name_slot(at + SUPPRESSED + ")") is None  # complete: free again
    ratio = head + " Debt-to-earnings ratio: no data ("
    assert rules.name_slot(ratio) == [no_data_note("ratio", values[2]) + ")"]
    assert rules.name_slot(ratio).pop().startswith("its median earnings is suppressed")
    assert Rules([docs[0]]).name_slot("[1] x. Median earnings: no data (") is None  # the row has earnings
    good, bad = head + f" Median earnings: no data ({SUPPRESSED}).", head + " Median earnings: no data (not reported)."
    assert check(good, ctx)["status"] == "verified"
    assert check(head + " Median earnings: no data (suppressed).", ctx)["status"] == "verified"  # as documents say
    verdict = check(bad, ctx)
    assert verdict["status"] == "unverified" and "the row's reason is" in verdict["problems"][0]
