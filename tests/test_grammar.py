"""The rows' grammar for remote engines (grounding.grammar.gbnf): every answer the advisor is trained to write about
its rows is in it, what the check calls a contradiction is not, and it stays small and quick to compile. Matched with
xgrammar (what vLLM reads grammars with) and, where llama-cpp-python is installed, llama.cpp's own grammar sampler."""

from __future__ import annotations

import json
import re
import time

import pytest

from collegeadvisor.data.scorecard import cited_names, read_row, winner_sentence
from collegeadvisor.data.scorecard_text import NO_CONTEXT_ANSWER
from collegeadvisor.grounding import check
from collegeadvisor.grounding.grammar import gbnf

xgr = pytest.importorskip("xgrammar")

_COMPILER = None


def compiled(grammar: str):
    """The grammar compiled for matching strings (no vocabulary: characters, not tokens)."""
    global _COMPILER
    if _COMPILER is None:
        _COMPILER = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False)
    return _COMPILER.compile_grammar(xgr.Grammar.from_ebnf(grammar))


def accepts(passages, answer: str, expected=None) -> bool:
    """Whether the rows' grammar holds the whole answer."""
    matcher = xgr.GrammarMatcher(compiled(gbnf(passages, expected)), terminate_without_stop_token=True)
    return matcher.accept_string(answer) and matcher.is_terminated()


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    from collegeadvisor.data.scorecard_qa import build_scorecard_dataset

    out = tmp_path_factory.mktemp("grammar_data")
    build_scorecard_dataset(out, n_examples=300, n_heldout=0, seed=0)
    return [{"answer": r["messages"][1]["content"], "context": r["context"], "kind": r["kind"]}
            for r in map(json.loads, (out / "scorecard.jsonl").read_text().splitlines())]


def cited(answer: str) -> list[int]:
    return [int(n) for n in re.findall(r"\[(\d+)\]", answer)]


def rows_of(ex) -> list[dict | None]:
    return [read_row(p) for p in ex["context"]]


def contradicted(ex, answer: str, expected=None) -> bool:
    """The check's verdict agrees: the changed answer is a contradiction, and the grammar refuses it."""
    verdict = check(answer, ex["context"], expected)
    return verdict["status"] == "unverified" and not accepts(ex["context"], answer, expected)


# ------------------------------------------------------------------------------------------ accepted
def test_every_training_answer_is_in_its_rows_grammar(examples):
    """Every kind of answer, each against the grammar of its own context; those that cite rows also with `expected`
    (the rows they cite, as resolution would give them). not_in_context answers (no citation, no figure) go through
    the grammar's fixed branch; no_context ones have no rows (the grammar of no passages)."""
    kinds = set()
    for ex in examples:
        answer, context = ex["answer"], ex["context"]
        assert accepts(context, answer), (ex["kind"], answer)
        if cited(answer) and ex["kind"] != "no_row":  # advise gives that reply itself, never a grammar with rows
            assert accepts(context, answer, expected=set(cited(answer))), (ex["kind"], answer)
        kinds.add(ex["kind"])
    assert {"premium", "no_data", "open", "compare", "earnings", "debt", "debt_to_earnings", "completers",
            "not_in_context", "no_context", "no_row", "off_topic", "unknown_school", "follow_up"} <= kinds
    assert accepts([], NO_CONTEXT_ANSWER)
    # the premium answers open with each verdict: Yes, No and Unknown
    openings = {m.group(1) for ex in examples for m in [re.match(r"\[\d\] (Yes|No|Unknown)\.", ex["answer"])] if m}
    assert openings == {"Yes", "No", "Unknown"}


def test_free_text_keeps_the_datasets_words(examples):
    """Between slots an answer may say what it likes in words and marks, and words that only contain an excluded
    one ("metadata", "tellers") are words of their own; no "(" (a pseudo-citation "(a)" opens with one)."""
    ex = next(e for e in examples if e["kind"] == "debt" and "no data" not in e["answer"])
    answer = ex["answer"] + (" Metadata aside, graduates of this program, and tellers too, borrow less than you'd "
                             "think; the debt is what it is: it's median, not mean - \"typical\"/usual! ")
    assert accepts(ex["context"], answer)
    assert accepts(ex["context"], ex["answer"] + " Café programs: señor.")
    assert not accepts(ex["context"], ex["answer"] + " See (a).")


# ------------------------------------------------------------------------------------------ rejected
def _figure_example(examples, kind):
    """An answer of `kind` that states its row's value for its field, with the row and its value text."""
    for ex in examples:
        if ex["kind"] != kind or "no data" in ex["answer"]:
            continue
        n = cited(ex["answer"])[0]
        row = rows_of(ex)[n - 1]
        field = {"earnings": "earnings", "debt": "debt"}[kind]
        return ex, n, row, row["values"][field]
    raise AssertionError(f"no {kind} answer with a figure")


def test_another_rows_or_fields_figure_is_rejected(examples):
    swapped_row = swapped_field = 0
    for ex in (e for e in examples if e["kind"] in ("earnings", "debt") and "no data" not in e["answer"]):
        n, rows = cited(ex["answer"])[0], rows_of(ex)
        field = ex["kind"]
        value = rows[n - 1]["values"][field]
        others = [r["values"].get(field) for m, r in enumerate(rows, 1) if r and m != n]
        for other in (o for o in others if o and o != value):  # another row's value for the field
            assert contradicted(ex, ex["answer"].replace(f": {value}", f": {other}")), (ex["answer"], other)
            swapped_row += 1
        for other in (v for f, v in rows[n - 1]["values"].items() if v and v != value and f != field):
            assert contradicted(ex, ex["answer"].replace(f": {value}", f": {other}")), (ex["answer"], other)
            swapped_field += 1
        # the right value passes, so the test is not vacuous
        assert accepts(ex["context"], ex["answer"]) and check(ex["answer"], ex["context"])["status"] == "verified"
    assert swapped_row >= 10 and swapped_field >= 10


def test_flipped_verdicts_are_rejected(examples):
    flips = {"Yes": ("No", "Unknown"), "No": ("Yes", "Unknown"), "Unknown": ("Yes", "No")}
    seen = set()
    for ex in (e for e in examples if e["kind"] in ("premium", "no_data")):
        m = re.match(r"\[\d\] (Yes|No|Unknown)\.", ex["answer"])
        if not m:
            continue
        seen.add(m.group(1))
        for other in flips[m.group(1)]:
            flipped = ex["answer"].replace(f"] {m.group(1)}.", f"] {other}.", 1)
            assert contradicted(ex, flipped), flipped
        test = re.search(r"(passes|fails) the test", ex["answer"])
        if test:  # the verdict after the figures, too
            other = {"passes": "fails", "fails": "passes"}[test.group(1)]
            assert contradicted(ex, ex["answer"].replace(test.group(), f"{other} the test")), ex["answer"]
    assert seen == {"Yes", "No", "Unknown"}


def test_no_data_for_a_field_the_row_has_is_rejected(examples):
    n_checked = 0
    for kind in ("earnings", "debt"):
        for ex in (e for e in examples if e["kind"] == kind and "no data" not in e["answer"]):
            value = rows_of(ex)[cited(ex["answer"])[0] - 1]["values"][kind]
            said = ex["answer"].replace(f": {value}.", ": no data.")
            assert said != ex["answer"] and contradicted(ex, said), said
            # nor in words of its own, outside the field's slot
            assert contradicted(ex, ex["answer"] + f" The Scorecard has no {kind} data for it.")
            n_checked += 1
    assert n_checked >= 20


def test_another_reason_for_no_data_is_rejected(examples):
    n_checked = 0
    for ex in (e for e in examples if "no data (" in e["answer"]):
        said = re.sub(r"no data \([^()]*\)", "no data (suppressed for privacy: no school is counted)", ex["answer"])
        assert contradicted(ex, said), said
        n_checked += 1
    assert n_checked >= 5


def test_another_rows_name_after_a_citation_is_rejected(examples):
    n_checked = 0
    for ex in (e for e in examples if e["kind"] in ("earnings", "debt", "premium")):
        n, rows = cited(ex["answer"])[0], rows_of(ex)
        mine = cited_names(rows[n - 1]["credential"], rows[n - 1]["program"], rows[n - 1]["school"])
        start = ex["answer"].index(mine[0])
        for m, other in enumerate(rows, 1):
            theirs = cited_names(other["credential"], other["program"], other["school"])[0]
            if m == n or theirs == mine[0]:
                continue
            renamed = ex["answer"][:start] + theirs + ex["answer"][start + len(mine[0]):]
            assert contradicted(ex, renamed), renamed
            n_checked += 1
    assert n_checked >= 20


def test_citations_outside_the_rows_asked_about_or_not_citations_are_rejected(examples):
    n_checked = 0
    for ex in (e for e in examples if e["kind"] in ("earnings", "debt")):
        answer, n = ex["answer"], cited(ex["answer"])[0]
        for m in range(1, len(ex["context"]) + 1):  # another retrieved row than the one asked about
            if m != n:
                assert contradicted(ex, answer, expected={m}), (answer, m)
        assert accepts(ex["context"], answer, expected={n})
        # a row that wasn't retrieved, a pseudo-citation, a figure before any citation
        for fake in ("[4]", "[I]", f"({n})", "[1a]", ""):
            changed = answer.replace(f"[{n}]", fake, 1)
            assert not accepts(ex["context"], changed), changed
            assert check(changed, ex["context"])["status"] == "unverified", changed
        n_checked += 1
    assert n_checked >= 20


def test_the_wrong_comparison_winner_is_rejected(examples):
    n_checked = 0
    for ex in (e for e in examples if e["kind"] == "compare"):
        rows = rows_of(ex)
        a, b = (rows[n - 1] for n in cited(ex["answer"]))
        hi, lo = sorted((a, b), key=lambda r: -float(r["values"]["earnings"].replace("$", "").replace(",", "")))
        by = "school" if ex["answer"].rstrip(".").endswith("earn more") else "what"
        right = winner_sentence(by, hi["credential"], hi["program"], hi["school"])
        wrong = winner_sentence(by, lo["credential"], lo["program"], lo["school"])
        assert ex["answer"].endswith(right + ".")
        assert right == wrong or contradicted(ex, ex["answer"].replace(right, wrong))
        # a winner sentence only closes a comparison (the check would admit one naming a one-row answer's row)
        one = ex["answer"].split(" [")[0]
        assert accepts(ex["context"], one)
        assert not accepts(ex["context"], f"{one} {right}.") and not accepts(ex["context"], f"{one} {wrong}.")
        n_checked += right != wrong
    assert n_checked >= 10


def test_a_fixed_answer_states_no_figure_verdict_or_winner(examples):
    ex = next(e for e in examples if e["kind"] == "not_in_context")
    assert accepts(ex["context"], ex["answer"])
    for claim in (" Median debt: $23,456.", " It passes the test.", " Graduates of Yale earn more.",
                  " [1] A row."):
        assert not accepts(ex["context"], ex["answer"] + claim), claim
        assert not accepts([], NO_CONTEXT_ANSWER + claim), claim


def test_a_passage_of_the_users_own_is_cited_with_its_own_figures():
    own = "Notes from my campus visit: tuition was $12,000 a year and the loan cap is $5,500."
    assert read_row(own) is None
    assert accepts([own], "[1] Tuition was $12,000 a year.")
    assert check("[1] Tuition was $12,000 a year.", [own])["status"] == "verified"
    assert not accepts([own], "[1] Tuition was $13,000 a year.")
    assert not accepts([own], "[2] Tuition was $12,000 a year.")


# ------------------------------------------------------------------------------------------ size and speed
def test_three_rows_grammar_is_small_and_compiles_fast(examples):
    three = [e for e in examples if len(e["context"]) == 3]
    assert len(three) > 100
    sizes, times = [], []
    for ex in three:
        grammar = gbnf(ex["context"])
        assert all(f"b{n} ::=" in grammar for n in (1, 2, 3))  # every row is citable
        sizes.append(len(grammar.encode()))
        start = time.perf_counter()
        compiled(grammar)
        times.append(time.perf_counter() - start)
    # measured: at most ~10.3 KB and ~11 ms (xgrammar 0.2.9, no vocabulary)
    assert max(sizes) < 14_000, max(sizes)
    assert sorted(times)[len(times) // 2] < 0.1 and max(times) < 0.5, (sorted(times)[len(times) // 2], max(times))


def test_compiles_against_a_real_vocabulary(examples, smol_tokenizer):
    """As vLLM compiles it: against the model's vocabulary (SmolLM2's 49k tokens), one thread; the answer's own
    tokens are accepted one by one, then the end of the text."""
    ex = next(e for e in examples if e["kind"] == "compare")
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(smol_tokenizer), cache_enabled=False,
                                   max_threads=1)
    start = time.perf_counter()
    grammar = compiler.compile_grammar(gbnf(ex["context"]))
    took = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(grammar)
    ids = smol_tokenizer.encode(ex["answer"], add_special_tokens=False)
    assert all(matcher.accept_token(i) for i in ids) and matcher.accept_token(smol_tokenizer.eos_token_id)
    assert took < 3.0, took  # measured ~0.35 s on one shared core


# ------------------------------------------------------------------------------------------ llama.cpp
@pytest.fixture(scope="module")
def llama_vocab():
    llama = pytest.importorskip("llama_cpp")
    from collegeadvisor.models import embedded_gguf

    params = llama.llama_model_default_params()
    params.vocab_only = True
    model = llama.llama_model_load_from_file(str(embedded_gguf("smollm2-135m-instruct")).encode(), params)
    assert model
    yield llama, llama.llama_model_get_vocab(model)
    llama.llama_model_free(model)


def llama_accepts(llama_vocab, grammar: str, text: str) -> bool:
    """llama.cpp's grammar sampler: parses the grammar, then admits the text's tokens one by one and the end."""
    import ctypes

    llama, vocab = llama_vocab
    sampler = llama.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    assert sampler, "llama.cpp refused the grammar"

    def admitted(token: int) -> bool:
        data = (llama.llama_token_data * 1)(llama.llama_token_data(token, 0.0, 0.0))
        llama.llama_sampler_apply(sampler, ctypes.byref(llama.llama_token_data_array(data, 1, -1, False)))
        return data[0].logit != float("-inf")

    try:
        raw = text.encode()
        buf = (llama.llama_token * (len(raw) + 8))()
        n = llama.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, True)
        for token in buf[:n]:
            if not admitted(token):
                return False
            llama.llama_sampler_accept(sampler, token)
        return admitted(llama.llama_vocab_eos(vocab))
    finally:
        llama.llama_sampler_free(sampler)


def test_llama_cpp_reads_the_grammar_and_holds_it_alike(examples, llama_vocab):
    for ex in examples:
        if ex["context"]:
            assert llama_accepts(llama_vocab, gbnf(ex["context"]), ex["answer"]), ex["answer"]
    ex = next(e for e in examples if e["kind"] == "premium" and "] Yes." in e["answer"])
    assert not llama_accepts(llama_vocab, gbnf(ex["context"]), ex["answer"].replace("] Yes.", "] No.", 1))
    assert not llama_accepts(llama_vocab, gbnf(ex["context"]), ex["answer"].replace("[1]", "[I]", 1))


def _row(school: str, earnings: float, **more) -> dict:
    row = {"inst_name": school, "state": "OH", "control": "Public", "cip_desc": "Practical Nursing.",
           "credential_desc": "Undergraduate Certificate or Diploma", "completers_count": 40.0, "earnings": earnings,
           "earnings_horizon": "4yr_after_completion", "earnings_threshold_state": 32100.0,
           "earnings_premium_state": earnings - 32100.0, "debt_median": 9000.0, "debt_to_earnings_ratio": 0.2,
           "debt_payback_years": 1.5}
    return row | more


def test_a_slot_after_a_comma_name_is_read_with_the_names_words():
    """ "[2] At Ridge High School, median earnings ...: $X": the check reads the clause's most specific cue, the
    school's "high school", so the figure is read as high-school graduate earnings. The grammar admits there only
    the slots the check reads by their own label; after a name that ends in "." every slot."""
    from collegeadvisor.data.scorecard import row_document

    docs = [row_document(_row("Probe College", 41000.0)), row_document(_row("Ridge High School", 52000.0))]
    head = "[1] Undergraduate Certificate or Diploma in Practical Nursing at Probe College. " \
           "Median earnings four years after completion: $41,000."
    comma = head + " [2] At Ridge High School, median earnings four years after completion: $52,000."
    assert check(comma, docs)["status"] == "unverified" and not accepts(docs, comma)
    said = head + " [2] At Ridge High School, high-school graduate earnings in OH: $32,100."
    assert check(said, docs)["status"] == "verified" and accepts(docs, said)
    full = head + (" [2] Undergraduate Certificate or Diploma in Practical Nursing at Ridge High School. Median "
                   "earnings four years after completion: $52,000.")
    assert check(full, docs)["status"] == "verified" and accepts(docs, full)
    assert accepts(docs, full + " Graduates of Ridge High School earn more.")
    assert not accepts(docs, full + " Graduates of Probe College earn more.")
