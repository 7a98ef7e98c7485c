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


def test_check_accepts_the_rows_own_figures(rows):
    docs, vals = rows
    good = (f"[1] Yes. Some program. Median earnings four years after completion: {vals[0]['earnings']}. "
            f"High-school graduate earnings in XX: {vals[0]['hs_earnings']}. Earnings premium: {vals[0]['premium']}.")
    verdict = check(good, docs)
    assert verdict["status"] == "verified" and verdict["cited"] == [1]
    assert [c["field"] for c in verdict["claims"] if c["type"] == "figure"] == ["earnings", "hs_earnings", "premium"]
    assert check(f"[3] A certificate. Median earnings: no data ({'suppressed'}).", docs)["status"] == "verified"


def test_check_catches_wrong_figure_wrong_field_wrong_verdict_and_invented(rows):
    docs, vals = rows
    wrong = check("[1] A program. Median earnings four years after completion: $12,345.", docs)
    assert wrong["status"] == "unverified" and "median earnings" in wrong["problems"][0]
    # a figure that is in the context, but under another field: the high-school figure stated as earnings
    field = check(f"[1] A program. Median earnings four years after completion: {vals[0]['hs_earnings']}.", docs)
    assert field["status"] == "unverified"
    assert check(f"[1] Median debt: {vals[0]['debt']}.", docs)["status"] == "verified"
    verdict = check(f"[2] Yes. Earnings premium: {vals[1]['premium']}.", docs)
    assert verdict["status"] == "unverified" and "fails" in verdict["problems"][0]
    assert check("[1] Unknown. A program.", docs)["problems"][0].endswith("has an earnings premium")
    assert check("[3] Unknown. A certificate. Median earnings: no data.", docs)["status"] == "verified"
    late = check(f"[2] x. Earnings premium: {vals[1]['premium']}, so it passes the test.", docs)
    assert late["status"] == "unverified" and "fails the test" in late["problems"][0]
    assert check(f"[2] x. Earnings premium: {vals[1]['premium']}, so it fails the test.", docs)["status"] == "verified"
    invented = check("[3] A certificate. Median earnings: $48,000.", docs)
    assert invented["status"] == "unverified" and "suppressed" in invented["problems"][0]
    abstain = check("[1] A program. Median debt: no data.", docs)
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
    assert check("[2] Graduates of this program earn more. " + said, docs)["status"] == "verified"  # no name


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
    # small numbers are not figures ("[1]", "4 years"); before any citation, any figure of the passages
    assert rules.admits("It takes ", "4") and rules.admits("Before citing: ", "$")


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
    assert body["grounding"]["status"] in ("verified", "no_claims", "unverified")
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
