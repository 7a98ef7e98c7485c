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
from typing import Any, Iterable

import numpy as np

# Headline metrics in report order: key in an aggregate dict -> label, direction, shown as a percentage.
METRICS: dict[str, dict[str, Any]] = {
    "numeric_accuracy": {"label": "Figure accuracy", "higher_is_better": True, "percent": True},
    "yes_no_accuracy": {"label": "Yes/no accuracy (premium)", "higher_is_better": True, "percent": True},
    "no_data_recall": {"label": "No-data recall", "higher_is_better": True, "percent": True},
    "rouge_l": {"label": "ROUGE-L F1", "higher_is_better": True, "percent": True},
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
}

_SCALE = {"k": 1e3, "thousand": 1e3, "m": 1e6, "mil": 1e6, "mn": 1e6, "million": 1e6, "bn": 1e9, "billion": 1e9}
_NUMBER = re.compile(
    r"(?<![\w.,$])(?P<neg>[-\u2212\u2013]?)(?P<cur>\$?)\s?(?P<neg2>-?)"
    r"(?>(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+))"
    r"(?:\s?(?P<suf>thousand|million|billion|mil|mn|bn|[kKmM])\b|(?![\w.]\d|\w))"
    r"(?P<pct>\s?%|\s(?:per\s?cent)\b)?(?P<usd>\s?(?:dollars|usd)\b)?",
    re.IGNORECASE,
)
_CIP = re.compile(r"\bCIP(?:\s*code)?\s*[:#]?\s*\d[\d.]*", re.IGNORECASE)
_YEAR = re.compile(r"(?:19|20)\d\d")
_ROUGE_MAX_CHARS = 20_000  # LCS is quadratic: a runaway reply is scored on its start


def _figures(text: str) -> list[tuple[float, bool, bool]]:
    """(value, is_money, is_percent) for every figure in text."""
    text = _CIP.sub(" ", text or "")
    out = []
    for m in _NUMBER.finditer(text):
        num, suf = m["num"], (m["suf"] or "").lower()
        if _YEAR.fullmatch(num) and not (m["cur"] or suf or m["pct"] or m["usd"]):
            continue
        value = float(num.replace(",", "")) * _SCALE.get(suf, 1.0)
        if not math.isfinite(value):  # a runaway string of digits
            continue
        if m["neg"] or m["neg2"]:
            value = -value
        money = bool(m["cur"] or m["usd"] or suf) or (abs(value) >= 1000 and not m["pct"])
        out.append((round(value, 6), money, bool(m["pct"])))
    return out


def parse_numbers(text: str | None) -> list[float]:
    """Every figure in a reply, in order (see the module docstring for the forms and the exclusions)."""
    return [v for v, _, _ in _figures(text or "")]


def numeric_correct(reply: str | None, reference: float, rel_tol: float = 0.01) -> bool:
    """Any figure in the reply within rel_tol of the reference, or equal to it at 2 decimals (ratios); a
    percentage also counts as its fraction (41% for 0.41)."""
    for value, _, pct in _figures(reply or ""):
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


def _plain(text: str | None) -> str:
    """Typographic apostrophes as ASCII, so "doesn’t" reads as "doesn't"."""
    return (text or "").replace("\u2019", "'").replace("\u2018", "'")


def yes_no(reply: str | None) -> bool | None:
    """The reply's yes/no answer to "do graduates earn more than high-school graduates?"; None when unclear."""
    text = _plain(reply)
    for pattern, verdict in _LEADING:
        if pattern.search(text):
            return verdict
    verdicts = set()
    for pattern, verdict in _PHRASES:
        if pattern.search(text):
            verdicts.add(verdict)
            text = pattern.sub(" ", text)
    return verdicts.pop() if len(verdicts) == 1 else None


_NO_DATA = re.compile(
    r"\bno\s+(?:\w+\s+){0,2}(?:data|information|figures?|records?)\b"
    r"|\b(?:not|isn't|aren't|wasn't|weren't)\s+(?:\w+\s+)?(?:available|reported|published|disclosed)\b"
    r"|\bunavailable\b|\bsuppress(?:ed|ion)\b|\bwithheld\b"
    r"|\b(?:doesn't|does\s+not|don't|do\s+not)\s+(?:have|include|report|list)\s+(?:any\s+)?(?:\w+\s+){0,2}"
    r"(?:data|information|figures?)\b"
    r"|\b(?:insufficient|not\s+enough|too\s+little|lacks?)\s+(?:\w+\s+)?(?:data|information)\b"
    r"|\btoo\s+few\s+(?:graduates|completers|students)\b|\bcan(?:'t|not)\s+tell\b",
    re.IGNORECASE,
)


def says_no_data(reply: str | None) -> bool:
    """Whether the reply says the Scorecard has no (or suppressed) data."""
    return bool(_NO_DATA.search(_plain(reply)))


def no_data_correct(reply: str | None) -> bool:
    """Says there is no data AND invents no dollar figure ($-sign, k/million suffix, "dollars" or >= 1,000)."""
    return says_no_data(reply) and not any(money for _, money, _ in _figures(reply or ""))


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reply: str | None, reference: str) -> float:
    """ROUGE-L F-measure of the reply against the reference (rouge-score, stemmed)."""
    return float(_scorer().score(reference or "", (reply or "")[:_ROUGE_MAX_CHARS])["rougeL"].fmeasure)


def _expected_yes(record: dict) -> bool | None:
    if record.get("yes") is not None:
        return bool(record["yes"])
    value = record.get("numeric")
    return value > 0 if isinstance(value, (int, float)) else None


def score_reply(record: dict, reply: str | None, stopped_at_eos: bool, n_tokens: int) -> dict[str, Any]:
    """Scores of one reply to a held-out record; a score that does not apply to the record's kind is None."""
    reply = reply if isinstance(reply, str) else ""
    kind = record.get("kind") or "unknown"
    ref_value = record.get("numeric")
    has_figure = kind not in ("premium", "no_data") and isinstance(ref_value, (int, float)) and math.isfinite(ref_value)
    expected_yes = _expected_yes(record) if kind == "premium" else None
    said = yes_no(reply) if kind == "premium" else None
    return {
        "kind": kind,
        "empty": reply.strip() == "",
        "stopped_at_eos": bool(stopped_at_eos),
        "n_tokens": int(n_tokens),
        "numeric_correct": numeric_correct(reply, float(ref_value)) if has_figure else None,
        "yes_no": said,
        "yes_no_correct": None if expected_yes is None else said == expected_yes,
        "no_data_correct": no_data_correct(reply) if kind == "no_data" else None,
        "rouge_l": rouge_l(reply, record.get("answer") or ""),
    }


def _finite(values: Iterable) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, (bool, int, float)) and math.isfinite(float(v)):
            out.append(float(v))
    return out


def _mean(values: Iterable) -> float | None:
    vals = _finite(values)
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
        vals = _finite(value)
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
    for name, value in (extra or {}).items():
        out |= _summarize(name, value)
    return out
