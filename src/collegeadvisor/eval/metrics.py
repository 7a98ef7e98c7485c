"""Per-question scores for advisor replies (figures, yes/no, no-data, ROUGE-L) and their aggregates.

Figures: `parse_numbers` reads $12,345 / 12345 / 12,345.67 / 12.3k / $1.2 million / 1.2M / $1.2 mil / 0.19 /
-$3,000 / 41%. Two things are never figures: a number right after "CIP" (a program code, "(CIP 5108)"), and a
bare year (a plain 4-digit integer 1900-2100 with no $, comma, decimals or suffix, "in 2024").
"""

from __future__ import annotations

import math
import numbers
import re
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np

from collegeadvisor.data.fields import KIND
from collegeadvisor.grounding import CITATION, check, figures, plain, same_value, says_no_data
from collegeadvisor.kb.retrieve import source_row_ids

# Headline metrics in report order: key in an aggregate dict -> label, direction, shown as a percentage.
METRICS: dict[str, dict[str, Any]] = {
    "numeric_accuracy": {"label": "Figure accuracy", "higher_is_better": True, "percent": True},
    "yes_no_accuracy": {"label": "Yes/no accuracy (premium)", "higher_is_better": True, "percent": True},
    "no_data_recall": {"label": "No-data recall", "higher_is_better": True, "percent": True},
    "rouge_l": {"label": "ROUGE-L F1", "higher_is_better": True, "percent": True},
    "grounded_rate": {"label": "Grounded (every claim agrees with its cited row)", "higher_is_better": True,
                      "percent": True},
    "outside_context_rate": {"label": "Figures not in the retrieved rows", "higher_is_better": False,
                             "percent": True},
    "empty_rate": {"label": "Empty replies", "higher_is_better": False, "percent": True},
    "stopped_at_eos_rate": {"label": "Stopped at EOS", "higher_is_better": True, "percent": True},
    "perplexity": {"label": "Perplexity (held-out answers)", "higher_is_better": False, "percent": False},
    "latency_s": {"label": "Latency mean (s)", "higher_is_better": False, "percent": False},
    "latency_s_p50": {"label": "Latency p50 (s)", "higher_is_better": False, "percent": False},
    "latency_s_p95": {"label": "Latency p95 (s)", "higher_is_better": False, "percent": False},
    "tokens_per_s": {"label": "Tokens/s", "higher_is_better": True, "percent": False},
}

# Per-question scores averaged by `aggregate`: score key -> aggregate key.
_RATES = {
    "empty": "empty_rate",
    "stopped_at_eos": "stopped_at_eos_rate",
    "numeric_correct": "numeric_accuracy",
    "yes_no_correct": "yes_no_accuracy",
    "no_data_correct": "no_data_recall",
    "rouge_l": "rouge_l",
    "grounded": "grounded_rate",
    "outside_context": "outside_context_rate",
}



_ROUGE_MAX_CHARS = 20_000  # LCS is quadratic: a runaway reply is scored on its start


def _figures(text: str) -> list[tuple[float, bool, bool]]:
    """(value, is_money, is_percent) for every figure in text."""
    return [(f.value, f.money, f.percent) for f in figures(text or "")]


def parse_numbers(text: str | None) -> list[float]:
    """Every figure in a reply, in order (see the module docstring for the forms and the exclusions)."""
    return [v for v, _, _ in _figures(text or "")]


def numeric_correct(reply: str | None, reference: float, rel_tol: float = 0.01) -> bool:
    """Any figure in the reply within rel_tol of the reference, or equal to it at 2 decimals (ratios); a
    percentage also counts as its fraction (41% for 0.41). A citation ("[3]") is no figure (a count of 3 is)."""
    for value, _, pct in _figures(CITATION.sub(" ", reply or "")):
        for v in (value, value / 100) if pct else (value,):
            if abs(v - reference) <= rel_tol * abs(reference) or round(v, 2) == round(reference, 2):
                return True
    return False


# Yes/no: a leading answer wins; otherwise every clear phrase found must agree. Negated phrases come first and
# are blanked out once matched, so "doesn't earn more" is never also read as "earn more".
_LEADING = [
    (re.compile(r"^\W*(yes|yeah|yep|absolutely|definitely|certainly)\b", re.I), True),
    (re.compile(r"^\W*(no|nope|not really)\b(?!\s+(data|information|figures?|records?|earnings)\b)", re.I), False),
]
_VERB = r"(?:earn|make|pay|get)s?"
_NOT = r"(?:does\s*not|doesn't|do\s*not|don't|did\s*not|didn't|won't|will\s*not|not|never)"
# A few words within one clause ("$1.2 million" does not end it), never across another "more"/"less".
_GAP = r"(?:(?!\b(?:more|less)\b)(?:[^.;]|\.\d)){0,60}?"
_PHRASES = [
    (re.compile(rf"\b{_NOT}\s+(?:\w+\s+){{0,2}}{_VERB}\b{_GAP}\bmore\b", re.I), False),
    (re.compile(rf"\b{_NOT}\s+(?:\w+\s+){{0,2}}(?:out-?earn|pay\s+off|worth\s+it|beat|pass)", re.I), False),
    (re.compile(rf"\b{_NOT}\s+(?:\w+\s+){{0,2}}fail", re.I), True),
    (re.compile(rf"\b{_VERB}\b{_GAP}\bless\b", re.I), False),
    (re.compile(r"\bfail(?:s|ed|ing)?\b", re.I), False),
    (re.compile(r"\bnegative\s+(?:earnings\s+)?premium\b", re.I), False),
    (re.compile(rf"\b{_VERB}\b{_GAP}\bmore\b", re.I), True),
    (re.compile(r"\b(?:out-?earns?|pays?\s+off|worth\s+it|beats?)\b", re.I), True),
    (re.compile(r"\bpass(?:es|ed|ing)?\b", re.I), True),
    (re.compile(r"\bpositive\s+(?:earnings\s+)?premium\b", re.I), True),
]


def yes_no(reply: str | None) -> bool | None:
    """The reply's yes/no answer to "do graduates earn more than high-school graduates?"; None when unclear."""
    text = CITATION.sub(" ", plain(reply))
    for pattern, verdict in _LEADING:
        if pattern.search(text):
            return verdict
    verdicts = set()
    for pattern, verdict in _PHRASES:
        if pattern.search(text):
            verdicts.add(verdict)
            text = pattern.sub(" ", text)
    return verdicts.pop() if len(verdicts) == 1 else None


def no_data_correct(reply: str | None) -> bool:
    """Says there is no data AND invents no dollar figure ($-sign, k/million suffix, "dollars" or >= 1,000)."""
    return says_no_data(reply) and not any(money for _, money, _ in _figures(reply or ""))


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer  # rouge-score (nltk): only when a reply is scored

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reply: str | None, reference: str) -> float:
    """ROUGE-L F-measure of the reply against the reference (rouge-score, stemmed)."""
    return float(_scorer().score(reference or "", (reply or "")[:_ROUGE_MAX_CHARS])["rougeL"].fmeasure)


def _expected_yes(record: dict) -> bool | None:
    if record.get("yes") is not None:
        return bool(record["yes"])
    value = record.get("numeric")
    return value > 0 if isinstance(value, (int, float)) else None


def _outside(reply: str, passages: Sequence[str]) -> bool:
    """Whether the reply states a figure that no retrieved passage holds."""
    held = [f.text.strip() for p in passages for f in figures(p) if f.counts]
    return any(not any(same_value(f.value, h) for h in held) for f in figures(reply) if f.counts)


def attribution(record: dict, reply: str, hit_ids: Sequence[str] | None) -> str:
    """Why an answer is wrong: the right row was not retrieved (retrieval_miss), the answer abstained wrongly or
    failed to (abstention_error), or it read another row or field than the right one in front of it
    (reading_error)."""
    wanted = set(source_row_ids(record))
    if record.get("kind") == "open":
        wanted = {r for r in wanted if r in set(hit_ids or ())} or wanted
    if hit_ids is not None and wanted and not wanted <= set(hit_ids):
        return "retrieval_miss"
    if record.get("kind") == "no_data" or says_no_data(reply):
        return "abstention_error"
    return "reading_error"


def score_reply(record: dict, reply: str | None, stopped_at_eos: bool, n_tokens: int,
                passages: Sequence[str] | None = None, hit_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Scores of one reply to a held-out record; a score that does not apply to the record's kind is None. With
    the passages it was answered from: whether it is grounded, states a figure outside them, and, when wrong, why
    (`attribution`, given the retrieved row ids)."""
    reply = reply if isinstance(reply, str) else ""
    kind = record.get("kind") or "unknown"
    ref_value = record.get("numeric")
    verdict = kind in KIND and KIND[kind].score == "verdict"  # how a kind is scored: data.fields.KINDS
    has_figure = not verdict and kind != "no_data" and isinstance(ref_value, (int, float)) and math.isfinite(ref_value)
    expected_yes = _expected_yes(record) if verdict else None
    said = yes_no(reply) if verdict else None
    numeric = numeric_correct(reply, float(ref_value)) if has_figure else None
    if kind == "open" and record.get("values"):
        numeric = any(numeric_correct(reply, float(v)) for v in record["values"])
    out = {
        "kind": kind,
        "empty": reply.strip() == "",
        "stopped_at_eos": bool(stopped_at_eos),
        "n_tokens": int(n_tokens),
        "numeric_correct": numeric,
        "yes_no": said,
        "yes_no_correct": None if expected_yes is None else said == expected_yes,
        "no_data_correct": no_data_correct(reply) if kind == "no_data" else None,
        "rouge_l": rouge_l(reply, record.get("answer") or ""),
        "grounded": None if passages is None else check(reply, passages)["status"] != "unverified",
        "outside_context": None if passages is None else _outside(reply, passages),
    }
    graded = [out[k] for k in ("numeric_correct", "yes_no_correct", "no_data_correct") if out[k] is not None]
    out["attribution"] = None if not graded or all(graded) else attribution(record, reply, hit_ids)
    return out


def _finite_values(values: Iterable) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out.append(float(v))
    return out


def _mean(values: Iterable) -> float | None:
    vals = _finite_values(values)
    return sum(vals) / len(vals) if vals else None


def _core(scores: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(scores)}
    for key, name in _RATES.items():
        out[name] = _mean(s.get(key) for s in scores)
    out["tokens_mean"] = _mean(s.get("n_tokens") for s in scores)
    return out


def _summarize(name: str, value: Any) -> dict[str, Any]:
    """An extra value: a list becomes its mean (under `name`), p50 and p95; a non-finite number becomes None."""
    if isinstance(value, (list, tuple, np.ndarray)):
        vals = _finite_values(value)
        p50, p95 = (np.percentile(vals, [50, 95]).tolist() if vals else (None, None))
        return {name: _mean(vals), f"{name}_p50": p50, f"{name}_p95": p95}
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return {name: float(value) if math.isfinite(value) else None}
    return {name: value}


def aggregate(scores: list[dict], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rates and means over per-question scores (each over the questions it applies to; None where none do),
    per-kind breakdowns under `by_kind`, and caller-measured extras (perplexity, latency_s, tokens_per_s: a
    number, or a list summarized as mean/p50/p95). Every METRICS key is present."""
    out: dict[str, Any] = dict.fromkeys(METRICS)
    out |= _core(scores)
    kinds = sorted({s.get("kind") or "unknown" for s in scores})
    out["by_kind"] = {k: _core([s for s in scores if (s.get("kind") or "unknown") == k]) for k in kinds}
    out["attribution"] = {a: sum(1 for s in scores if s.get("attribution") == a)
                          for a in ("retrieval_miss", "reading_error", "abstention_error")}
    for name, value in (extra or {}).items():
        out |= _summarize(name, value)
    return out
