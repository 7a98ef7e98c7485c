"""The words of one Scorecard example, filled in from its rows: the question, the reference answer (the citation,
the row named, each figure under its field's label) and what eval scores a held-out answer by."""

from __future__ import annotations

from typing import Any

from collegeadvisor.data.scorecard import HORIZON, _missing, program_name, row_title, row_values
from collegeadvisor.data.scorecard_text import ANSWERS, SHORT_CREDENTIAL, SUPPRESSED, TEMPLATES


def _what(r, rng) -> tuple[str, str]:
    cred = str(r["credential_desc"])
    if rng.random() < 0.5:
        cred = SHORT_CREDENTIAL.get(cred, cred)
    what = f"{cred} in {program_name(r)}"
    return what, ("an " if what[0].lower() in "aeiou" else "a ") + what


def question_text(kind: str, sub: str, recs: list[dict], template: int, rng) -> str:
    text = TEMPLATES[kind if kind in ("premium", "open") else sub][template]
    if sub in ("schools", "programs"):
        a, b = recs
        if sub == "schools":
            what, a_what = _what(a, rng)
            q = text.format(what=what, a_what=a_what, school_a=a["inst_name"], school_b=b["inst_name"])
        else:
            (what_a, a_what_a), (what_b, a_what_b) = _what(a, rng), _what(b, rng)
            q = text.format(school=a["inst_name"], what_a=what_a, a_what_a=a_what_a, what_b=what_b, a_what_b=a_what_b)
    elif kind == "open":
        q = text.format(program=program_name(recs[0]), school=recs[0]["inst_name"])
    else:
        what, a_what = _what(recs[0], rng)
        q = text.format(what=what, a_what=a_what, school=recs[0]["inst_name"])
    return q[0].upper() + q[1:]


def row_name(r) -> str:
    return row_title(r["credential_desc"], program_name(r), r["inst_name"])


def _earnings_label(r) -> str:
    return f"Median earnings {HORIZON[r['earnings_horizon']]} after completion"


def row_source(r, *extra: str) -> dict[str, Any]:
    out = {"row_id": str(r["row_id"]), "unitid": str(r["unitid"]), "school": str(r["inst_name"]),
           "program": program_name(r), "credential": str(r["credential_desc"])}
    for f in extra:
        v = r[f]
        out[f] = None if _missing(v) else (float(v) if isinstance(v, (int, float)) else str(v))
    return out


# ------------------------------------------------------------------------------------------ answers
def answer_text(kind: str, sub: str, recs: list[dict], cite: dict[str, int]) -> str:
    """The reference answer: the citation, the row named, each figure under its field's label."""
    r = recs[0]
    if (kind, sub) in ANSWERS:
        vals = {k: v for k, v in row_values(r).items() if v is not None}
        horizon = HORIZON.get(r["earnings_horizon"])
        return ANSWERS[(kind, sub)].format(
            tag=f"[{cite[r['row_id']]}]", name=row_name(r), horizon=horizon, state=r["state"], suppressed=SUPPRESSED,
            earnings_label=_earnings_label(r) if horizon else "", **vals,
            missing="median earnings" if "earnings" not in vals else "median debt")
    if kind == "open":
        parts = []
        for i, x in enumerate(sorted(recs, key=lambda x: cite[x["row_id"]])):
            v = row_values(x)["earnings"]
            label = _earnings_label(x) if v is not None else "Median earnings"
            value = v if v is not None else f"no data ({SUPPRESSED})"
            name = row_name(x) if i == 0 else f"{x['credential_desc']}"
            parts.append(f"[{cite[x['row_id']]}] {name}. {label}: {value}.")
        return " ".join(parts)
    a, b = recs
    hi = a if a["earnings"] > b["earnings"] else b
    va, vb = row_values(a)["earnings"], row_values(b)["earnings"]
    if sub == "schools":
        second, winner = f"At {b['inst_name']}", f"Graduates of {hi['inst_name']} earn more"
    else:
        second, winner = f"{b['credential_desc']} in {program_name(b)}", (
            f"The {hi['credential_desc']} in {program_name(hi)} pays more")
    return (f"[{cite[a['row_id']]}] {row_name(a)}. {_earnings_label(a)}: {va}. [{cite[b['row_id']]}] {second}, "
            f"{_earnings_label(b).lower()}: {vb}. {winner}.")


def reference_for(kind: str, sub: str, recs: list[dict]) -> dict[str, Any]:
    """What eval scores a held-out answer by: the figure, the yes/no, the rows."""
    r = recs[0]
    if kind == "earnings":
        return {"numeric": float(r["earnings"]), "source": row_source(r, "earnings", "earnings_horizon")}
    if kind == "debt":
        return {"numeric": float(r["debt_median"]), "source": row_source(r, "debt_median")}
    if kind == "debt_to_earnings":
        return {"numeric": round(float(r["debt_to_earnings_ratio"]), 2),
                "source": row_source(r, "debt_to_earnings_ratio", "debt_median", "earnings")}
    if kind == "premium":
        prem = float(r["earnings_premium_state"])
        return {"numeric": prem, "yes": prem > 0,
                "source": row_source(r, "earnings", "earnings_threshold_state", "earnings_premium_state", "state")}
    if kind == "no_data":
        field = {"earnings": "earnings", "premium": "earnings", "debt": "debt"}.get(sub)
        field = field or ("earnings" if _missing(r["earnings"]) else "debt")
        return {"numeric": None, "source": row_source(r) | {"asked": sub, "suppressed": field}}
    if kind == "open":
        values = [float(x["earnings"]) for x in recs if not _missing(x["earnings"])]
        return {"numeric": None, "values": values, "source": row_source(r) | {"rows": [row_source(x) for x in recs]}}
    a, b = recs
    hi, lo = (a, b) if a["earnings"] > b["earnings"] else (b, a)
    return {"numeric": float(hi["earnings"]),
            "source": row_source(hi, "earnings") | {"compare_with": row_source(lo, "earnings")}}
