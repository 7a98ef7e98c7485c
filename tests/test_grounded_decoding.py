"""Decoding under `grounding.Rules` (generate.GroundedDecoding) with real tokenizers: a "[...]" can only be a
citation "[n]", and right after one only the cited row's own name can be spelt."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from collegeadvisor import grounding
from collegeadvisor.data.scorecard import read_row, row_document
from collegeadvisor.generate import GroundedDecoding, _finish, _token_texts, generate, stream_batch
from collegeadvisor.grounding import Rules


def hand_row(school: str, credential: str, program: str, earnings: float) -> dict:
    """A Scorecard table row as `row_document` reads it (no table load)."""
    return {"inst_name": school, "state": "CO", "control": "Public", "cip_desc": program + ".",
            "credential_desc": credential, "completers_count": 120.0, "earnings": earnings,
            "earnings_horizon": "4yr_after_completion", "earnings_threshold_state": 30000.0,
            "earnings_premium_state": earnings - 30000.0, "debt_median": 20000.0,
            "debt_to_earnings_ratio": round(20000.0 / earnings, 2), "debt_payback_years": None}


DOCS = [row_document(r) for r in (
    hand_row("University of Colorado Boulder", "Bachelor's Degree", "Computer Science", 78922.0),
    hand_row("University of Colorado Boulder", "Master's Degree", "Computer Science", 98000.0),
    hand_row("Colorado State University-Fort Collins", "Bachelor's Degree", "Computer Science", 58922.0))]
AT = "[1] Bachelor's Degree in Computer Science at"  # next: " University of Colorado Boulder." and nothing else


def _kept(tok, rules: Rules, text: str) -> set[int]:
    """The ids GroundedDecoding leaves finite after `text`, read through its own decode of the tokenized text."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    scores = torch.zeros(1, len(tok))
    GroundedDecoding(tok, [rules], 0)(torch.tensor([ids]), scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


def _spelling(tok, want: str, unless: tuple[str, ...] = ()) -> set[int]:
    """Ids of tokens whose text begins `want` (and begins none of `unless`)."""
    return {i for text, ids in _token_texts(tok).items() if text and want.startswith(text)
            and not any(u.startswith(text) for u in unless) for i in ids}


def _rivals_banned(tok, rules: Rules, text: str, rivals: list[str]) -> int:
    """How many tokens that spell one of `rivals` (and not the cited row's name) are banned after `text`, or after
    `text` + " " (a small vocabulary spells a word after its space) -- all of them, or the test fails."""
    found = 0
    for at, cut in ((text, 0), (text + " ", 1)):
        rival = set().union(*(_spelling(tok, r[cut:], unless=tuple(rules.name_slot(at))) for r in rivals))
        assert not rival & _kept(tok, rules, at), (at, rivals)
        found += len(rival)
    return found


def test_after_a_citation_only_the_cited_rows_name_is_spelt(tokenizer):
    rules = Rules(DOCS)
    texts = {i: t for t, ids in _token_texts(tokenizer).items() for i in ids}
    for text in ("[1]", AT, "[2]"):
        rests = rules.name_slot(text)
        kept = _kept(tokenizer, rules, text)
        assert kept and all(any(r.startswith(texts[i]) for r in rests) for i in kept), (text, rests)
    assert _rivals_banned(tokenizer, rules, AT, [" Colorado State University-Fort Collins."])  # another school
    others = [" " + name for doc in DOCS[1:] for name in grounding.row_names(read_row(doc))]
    assert _rivals_banned(tokenizer, rules, "[1]", others)  # the other rows' names
    assert _spelling(tokenizer, " Master's Degree") & _kept(tokenizer, rules, "[2]")  # row [2]'s own name
    done = _kept(tokenizer, rules, AT + " University of Colorado Boulder.")
    assert _spelling(tokenizer, " Colorado State University") <= done  # once the name is complete, the slot is over


def test_inside_a_bracket_only_a_citation_is_written(tokenizer):
    rules = Rules(DOCS)
    texts = _token_texts(tokenizer)
    letters = {i for t, ids in texts.items() if t[:1].isalpha() for i in ids}
    close, one, four = set(texts.get("]", ())), set(texts.get("1", ())), set(texts.get("4", ()))
    opened = _kept(tokenizer, rules, "Hello [")
    assert one <= opened and not (letters | close | four) & opened
    assert close <= _kept(tokenizer, rules, "Hello [1") and not letters & _kept(tokenizer, rules, "Hello [1")
    free = _kept(tokenizer, rules, "Hello")
    bad = {i for t, ids in texts.items() if "[" in t and t.split("[")[-1][:1] not in "0123456789" for i in ids}
    assert bad and not bad & free  # "[I", "[a", "['", "[[" ... can't be written
    assert set(texts.get("[", ())) | set(texts.get(" [", ())) <= free


def test_a_batchs_rows_keep_their_own_rules():
    """Decisions are cached across a batch's rows: the key tells rows with other rows asked about apart."""
    assert Rules(DOCS, expected={1}).decision_key("Hello") != Rules(DOCS).decision_key("Hello")
    assert Rules(DOCS).decision_key("Hello") == Rules(list(DOCS)).decision_key("Hello")


class _Bias(LogitsProcessor):
    """Pushes a model towards "[", then "1", then "]", and towards another row's name: "[1] Master's Degree"."""

    def __init__(self, weights: dict[int, float]):
        self.ids, self.weights = list(weights), torch.tensor(list(weights.values()))

    def __call__(self, input_ids, scores):
        scores[:, self.ids] += self.weights.to(scores.dtype)
        return scores


def test_generate_writes_the_cited_rows_exact_name(tiny_model, monkeypatch):
    import collegeadvisor.generate as gen

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    texts = _token_texts(tok)
    weights = {i: w for t, w in (("[", 40.0), ("1", 20.0), ("]", 10.0)) for i in texts.get(t, ())}
    weights |= {i: 30.0 for i in _spelling(tok, " Master's Degree", unless=(" Bachelor", " Yes"))}
    real = gen._processors
    monkeypatch.setattr(gen, "_processors", lambda *a, **k: LogitsProcessorList([*real(*a, **k), _Bias(weights)]))
    out = generate(model, tok, [[{"role": "user", "content": "What do CS grads at CU Boulder earn?"}]],
                   max_new_tokens=120, passages=[DOCS])[0]["text"]
    names = grounding.row_names(read_row(DOCS[0]))
    assert any(out.startswith(f"[1] {name}") or out.startswith(f"[1] Yes. {name}") for name in names), out
    cited = list(grounding.CITATION.finditer(out))
    assert cited and all(m.group() == "[1]" for m in cited), out
    spoken = [c for c in grounding.check(out, DOCS)["claims"] if c["type"] == "name"]
    assert len(spoken) == len(cited) and all(c["problem"] is None for c in spoken), out


def test_a_reply_cut_in_a_citation_loses_it():
    class Tok:
        def __init__(self, text):
            self.text = text

        def decode(self, ids, skip_special_tokens=True):
            return self.text

    rules = Rules(DOCS)
    assert _finish(Tok("[1] Bachelor's Deg"), [5], stops=[2], rules=rules)["text"] == ""
    done = "[1] Bachelor's Degree. Median earnings four years after completion: $78,922."
    assert _finish(Tok(done + " [2"), [5], stops=[2], rules=rules)["text"] == done
    assert _finish(Tok(done + " [2] Master's"), [5], stops=[2], rules=rules)["text"] == done
    assert _finish(Tok(done), [5], stops=[2], rules=rules)["text"] == done


def test_stream_batch_passes_the_rows_asked_about(smol_tiny_model, monkeypatch):
    import collegeadvisor.generate as gen

    tok = AutoTokenizer.from_pretrained(smol_tiny_model)
    model = AutoModelForCausalLM.from_pretrained(smol_tiny_model).eval()
    seen = []

    class Spy(gen.GroundedDecoding):
        def __call__(self, input_ids, scores):
            seen.append([r.expected for r in self.rules])
            return super().__call__(input_ids, scores)

    monkeypatch.setattr(gen, "GroundedDecoding", Spy)
    stream_batch(model, tok, [[{"role": "user", "content": "Earnings?"}]], 3, 0.0, 1.0, [threading.Event()],
                 [lambda piece: None], passages=[DOCS], expected=[[1]])
    assert seen and seen[0] == [{1}]


def test_a_comparisons_winner_can_only_be_the_row_that_earns_more(tokenizer):
    both = "[1] Bachelor's Degree in Computer Science at University of Colorado Boulder. Median earnings four years " \
           "after completion: $78,922. [3] At Colorado State University-Fort Collins, median earnings four years " \
           "after completion: $58,922."
    rules = Rules(DOCS)
    assert rules.name_slot(both + " Graduates of ") == ["University of Colorado Boulder earn more"]
    assert rules.name_slot(both + " Graduates of University of Colorado Boulder earn more") is None
    # both schools teach the program: "The Bachelor's Degree in Computer Science pays more" would name both rows,
    # which the check refuses, so decoding refuses the opening "The" there and keeps "Graduates of"
    assert rules.refused_openings(both) == ("The",)
    assert rules.name_slot(both + " The") is None
    kept = _kept(tokenizer, rules, both)
    assert not _spelling(tokenizer, " The", unless=(" ",)) & kept and _spelling(tokenizer, " Graduates") & kept
    assert grounding.check(both + " The Bachelor's Degree in Computer Science pays more.", DOCS)["status"] == \
        "unverified"
    assert grounding.check(both + " Graduates of University of Colorado Boulder earn more.", DOCS)["status"] == \
        "verified"
    assert rules.name_slot("The retrieved rows") is None  # one cited row or none: no comparison
    assert _rivals_banned(tokenizer, rules, both + " Graduates of", ["Colorado State University-Fort Collins"])
    wrong = both + " Graduates of Colorado State University-Fort Collins earn more."
    assert grounding.check(wrong, DOCS)["status"] == "unverified"


def test_a_value_slot_keeps_the_space_dollar_whatever_order_the_vocabulary_comes_in(tokenizer):
    """After "Median earnings ...:" the slot keeps " $" (the dataset writes ": $52,861"). A token class is asked
    about by one of its texts; when " $" shared a class with " ($", the text that happened to come first in the
    process's vocabulary order decided for both, and answers lost the space in some processes and not others."""
    from collegeadvisor.generate import _token_classes

    rules = Rules(DOCS, None, [1])
    text = f"[1] {grounding.row_names(read_row(DOCS[0]))[0]} Median earnings four years after completion:"
    assert rules.value_slot(text)
    assert _spelling(tokenizer, " $") <= _kept(tokenizer, rules, text) or _spelling(tokenizer, " ") <= _kept(
        tokenizer, rules, text)
    for kind in ("figure", "word"):  # a class never mixes texts that begin differently once stripped
        for _, (ids, _piece) in _token_classes(tokenizer)[kind]:
            texts = {tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(i)]).strip()[:1]
                     for i in ids}
            assert len(texts) <= 1 or kind == "word", texts
    assert list(_token_texts(tokenizer).values())[0][0] == min(i for ids in _token_texts(tokenizer).values()
                                                               for i in ids)  # the vocabulary read by id



def test_the_reason_after_no_data_is_spelt_for_the_model(tokenizer):
    """After "no data (" in a suppressed field's slot only the row's reason can be spelt, and once it is written,
    the ")" that closes it."""
    from collegeadvisor.data.scorecard_text import SUPPRESSED

    row = hand_row("University of Colorado Boulder", "Bachelor's Degree", "Computer Science", 78922.0)
    row.update(earnings=None, earnings_premium_state=None, debt_to_earnings_ratio=None)
    rules = Rules([row_document(row)])
    head = "[1] Bachelor's Degree in Computer Science at University of Colorado Boulder. Median earnings: no data ("
    texts = _token_texts(tokenizer)
    by_id = {i: t for t, ids in texts.items() for i in ids}
    assert all(SUPPRESSED.startswith(by_id[i]) for i in _kept(tokenizer, rules, head))
    assert {by_id[i] for i in _kept(tokenizer, rules, head + SUPPRESSED)} == {")"}
