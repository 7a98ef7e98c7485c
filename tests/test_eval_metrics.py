"""Scoring replies: figure parsing, yes/no, no-data, per-question scores and aggregates."""

from __future__ import annotations

import json
import math

import pytest

from collegeadvisor.eval.metrics import (
    METRICS,
    aggregate,
    no_data_correct,
    numeric_correct,
    parse_numbers,
    rouge_l,
    says_no_data,
    score_reply,
    yes_no,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a median of $12,345 after", [12345.0]),
        ("about 12345 a year", [12345.0]),
        ("earned 12,345.67.", [12345.67]),
        ("roughly 12.3k", [12300.0]),
        ("roughly 12.3K", [12300.0]),
        ("$45k", [45000.0]),
        ("$1.2 million over a career", [1_200_000.0]),
        ("1.2M", [1_200_000.0]),
        ("$1.2 mil", [1_200_000.0]),
        ("a ratio of 0.19", [0.19]),
        ("a premium of -$3,000", [-3000.0]),
        ("a premium of $-3,000", [-3000.0]),
        ("a premium of \u2212$3,000", [-3000.0]),
        ("from $30,000-$40,000", [30000.0, 40000.0]),
        ("41% of earnings", [41.0]),
        ("$65,432 vs $48,100 (College Scorecard).", [65432.0, 48100.0]),
        ("$ 45,000 dollars", [45000.0]),
    ],
)
def test_parse_numbers_forms(text, expected):
    assert parse_numbers(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "Nursing (CIP 5138) at X",
        "CIP code 51.3801",
        "CIP: 5108",
        "data for 2024",
        "the 2019-2020 cohort",
        "the 4th year",
        "",
    ],
)
def test_parse_numbers_ignores_codes_years_and_ordinals(text):
    assert parse_numbers(text) == []


def test_parse_numbers_keeps_figure_next_to_cip_code():
    assert parse_numbers("Nursing (CIP 5138) graduates earn $65,432; a year-like $2,024 is money") == [65432.0, 2024.0]


@pytest.mark.parametrize(
    "reply, reference, ok",
    [
        ("Graduates earn a median of $65,432.", 65432.0, True),
        ("About $65k.", 65432.0, True),  # within 1%
        ("About $64k.", 65432.0, False),  # 2.2% off
        ("The ratio is 0.41.", 0.41, True),
        ("The ratio is 0.414.", 0.41, True),
        ("The ratio is 0.4.", 0.41, False),
        ("Debt is 41% of earnings.", 0.41, True),
        ("They earn $3,000 less.", -3000.0, False),  # sign matters
        ("A premium of -$3,000.", -3000.0, True),
        ("Nursing (CIP 5138) earns $1,000.", 5138.0, False),
        ("", 65432.0, False),
    ],
)
def test_numeric_correct(reply, reference, ok):
    assert numeric_correct(reply, reference) is ok


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Yes, graduates earn more.", True),
        ("Yes. Graduates earn $24,310 more than a typical high-school graduate.", True),
        ("No, they earn less.", False),
        ("No. Graduates earn a median $30,000, $5,000 less than the $35,000 a high-school graduate earns.", False),
        ("Graduates doesn\u2019t earn more than high-school graduates.", False),
        ("They do not earn more than high-school graduates.", False),
        ("They earn $24,310 more than a typical high-school graduate.", True),
        ("They make $1.2 million more over a career.", True),
        ("The program fails the earnings-premium test.", False),
        ("The program passes the earnings-premium test.", True),
        ("It does not pass the test.", False),
        ("It does not fail the test.", True),
        ("They earn more but borrow less.", True),
        ("No data is available for this program.", None),
        ("Graduates of this program live in Ohio.", None),
        ("", None),
        (None, None),
    ],
)
def test_yes_no(reply, expected):
    assert yes_no(reply) is expected


@pytest.mark.parametrize(
    "reply",
    [
        "The College Scorecard has no earnings data for X: the figure is suppressed for privacy.",
        "That figure is not available.",
        "Earnings are not reported for this program.",
        "The Scorecard doesn't have data on that program.",
        "There is insufficient data to say.",
        "Too few graduates were counted.",
    ],
)
def test_no_data_detected(reply):
    assert says_no_data(reply)
    assert no_data_correct(reply)


def test_no_data_with_invented_figure_is_wrong():
    reply = "There is no data, but graduates probably earn around $40,000."
    assert says_no_data(reply)
    assert not no_data_correct(reply)
    assert not no_data_correct("Graduates earn a median of $45,000.")
    assert no_data_correct("No data: fewer than 30 graduates were counted.")  # a count is not a dollar figure


def test_rouge_l_bounds():
    ref = "Graduates earned a median of $65,432 four years after completion."
    assert rouge_l(ref, ref) == pytest.approx(1.0)
    assert rouge_l("", ref) == 0.0
    assert 0.0 < rouge_l("Graduates earned a lot.", ref) < 1.0


EARNINGS = {"question": "q1", "answer": "Graduates earn a median of $65,432 (College Scorecard).",
            "numeric": 65432.0, "kind": "earnings", "source": {}}
PREMIUM = {"question": "q2", "answer": "No. Graduates earn $3,000 less.", "numeric": -3000.0, "kind": "premium",
           "yes": False, "source": {}}
NO_DATA = {"question": "q3", "answer": "The College Scorecard has no earnings data: suppressed.", "numeric": None,
           "kind": "no_data", "source": {}}


def test_score_reply_by_kind():
    s = score_reply(EARNINGS, "They earn $65,432.", True, 12)
    assert (s["numeric_correct"], s["yes_no_correct"], s["no_data_correct"], s["empty"]) == (True, None, None, False)
    p = score_reply(PREMIUM, "No, they earn $3,000 less.", True, 9)
    assert p["numeric_correct"] is None and p["yes_no_correct"] is True
    assert score_reply(PREMIUM, "Yes, they earn more.", True, 9)["yes_no_correct"] is False
    n = score_reply(NO_DATA, "No data: it is suppressed.", False, 7)
    assert n["no_data_correct"] is True and n["numeric_correct"] is None and n["stopped_at_eos"] is False
    assert score_reply(NO_DATA, "Graduates earn $50,000.", True, 5)["no_data_correct"] is False


GARBAGE = [None, "", "   \n", "\x00\x00", "\ud800\u202e\ufffd 💥" * 50, "$" * 5000, "9" * 20000]


@pytest.mark.parametrize("reply", GARBAGE)
@pytest.mark.parametrize("record", [EARNINGS, PREMIUM, NO_DATA])
def test_score_reply_never_raises_on_garbage(record, reply):
    s = score_reply(record, reply, False, 0)
    assert s["empty"] is (reply is None or not reply.strip())
    assert s["numeric_correct"] in (None, False)
    assert s["yes_no_correct"] in (None, False)
    assert s["no_data_correct"] in (None, False)
    assert 0.0 <= s["rouge_l"] <= 1.0
    json.dumps(s)


def test_aggregate_rates_and_missing_kinds():
    scores = [
        score_reply(EARNINGS, "They earn $65,432.", True, 10),
        score_reply(EARNINGS, "", False, 0),
        score_reply(NO_DATA, "No data, it is suppressed.", True, 6),
    ]
    agg = aggregate(scores)
    assert agg["n"] == 3
    assert agg["numeric_accuracy"] == pytest.approx(0.5)
    assert agg["empty_rate"] == pytest.approx(1 / 3)
    assert agg["stopped_at_eos_rate"] == pytest.approx(2 / 3)
    assert agg["no_data_recall"] == 1.0
    assert agg["yes_no_accuracy"] is None  # no premium questions: None, not NaN or ZeroDivisionError
    assert set(agg["by_kind"]) == {"earnings", "no_data"}
    assert agg["by_kind"]["earnings"]["numeric_accuracy"] == pytest.approx(0.5)
    assert agg["by_kind"]["no_data"]["numeric_accuracy"] is None
    assert set(METRICS) <= set(agg)
    assert agg["perplexity"] is None and agg["latency_s_p95"] is None


def test_aggregate_empty_and_extras():
    agg = aggregate([], extra={"perplexity": float("nan"), "latency_s": [1.0, 2.0, 3.0, 10.0], "tokens_per_s": 42.0})
    assert agg["n"] == 0
    for key in ("numeric_accuracy", "empty_rate", "rouge_l", "stopped_at_eos_rate", "perplexity"):
        assert agg[key] is None
    assert agg["latency_s"] == pytest.approx(4.0)
    assert agg["latency_s_p50"] == pytest.approx(2.5)
    assert 3.0 < agg["latency_s_p95"] <= 10.0
    assert agg["tokens_per_s"] == 42.0
    assert aggregate([], extra={"latency_s": []})["latency_s_p50"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in agg.values())


def test_metrics_constant_shape():
    assert list(METRICS)[0] == "numeric_accuracy"
    for spec in METRICS.values():
        assert isinstance(spec["label"], str) and spec["label"]
        assert isinstance(spec["higher_is_better"], bool)
    assert METRICS["empty_rate"]["higher_is_better"] is False
