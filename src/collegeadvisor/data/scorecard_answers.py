"""The words of one Scorecard example, filled in from its rows: the question, the reference answer (the citation,
the row named, each figure under its field's label) and what eval scores a held-out answer by."""

from __future__ import annotations

from typing import Any

from collegeadvisor.data.fields import FIELD, KIND, KIND_OF_FIELD, VERDICT_SIGN, covers, suppressed_field
from collegeadvisor.data.scorecard import HORIZON, _missing, program_name, row_names, row_values, winner_sentence
from collegeadvisor.data.scorecard_text import (
    AMBIGUOUS,
    ASK_PROGRAM,
    ASK_SCHOOL,
    NO_ROW,
    NO_ROW_NEAREST,
    OFF_TOPIC,
    SHORT_CREDENTIAL,
    SUPPRESSED,
    TEMPLATES,
    UNKNOWN_SCHOOL,
)


def _what(r, rng) -> tuple[str, str]:
    cred = str(r["credential_desc"])
    if rng.random() < 0.5:
        cred = SHORT_CREDENTIAL.get(cred, cred)
    what = f"{cred} in {program_name(r)}"
    return what, ("an " if what[0].lower() in "aeiou" else "a ") + what


def templates(kind: str, sub: str) -> list[str] | tuple[str, ...]:
    """The question templates of an example's (kind, sub): a "no data" question is asked as its sub's kind."""
    if kind in KIND or sub in KIND:
        return KIND[kind if kind in KIND else sub].questions
    return TEMPLATES[kind if kind == "open" else sub]


def question_text(kind: str, sub: str, recs: list[dict], template: int, rng) -> str:
    text = templates(kind, sub)[template]
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


def names_of(r) -> dict[str, str]:
    """A table row's names, by form (`data.scorecard.NAME_FORMS`)."""
    return row_names(r["credential_desc"], program_name(r), r["inst_name"])


def row_name(r) -> str:
    return names_of(r)["full"]


def _earnings_label(r) -> str:
    return FIELD["earnings"].label_for(HORIZON[r["earnings_horizon"]], None)


def row_source(r, *extra: str) -> dict[str, Any]:
    out = {"row_id": str(r["row_id"]), "unitid": str(r["unitid"]), "school": str(r["inst_name"]),
           "program": program_name(r), "credential": str(r["credential_desc"])}
    for f in extra:
        v = r[f]
        out[f] = None if _missing(v) else (float(v) if isinstance(v, (int, float)) else str(v))
    return out


# ------------------------------------------------------------------------------------------ answers
# Why a row has no value for a field, as an answer's "no data (...)" gives it: the privacy suppression, or, for a
# field computed from others (the debt-to-earnings ratio), the suppressed field it needs. The dataset's answers say
# exactly this (tests/test_scorecard.py reads every one back); decoding writes it and the check holds answers to it.
NOT_REPORTED = "not reported for this row"
NOTE_OF_KIND = {"completers": NOT_REPORTED}


def no_data_note(name: str, values: dict) -> str | None:
    """The reason an answer gives after "no data" for field `name` of a row with these values (`row_values`, or a
    read-back row's), or None where the row's values don't give one (the field has a value, or it has no kind)."""
    kind = KIND_OF_FIELD.get(name)
    if kind is None or values.get(name) is not None:
        return None
    if kind.name in NOTE_OF_KIND:
        return NOTE_OF_KIND[kind.name]
    missing = suppressed_field(kind, values)
    if missing == name:
        return SUPPRESSED
    return f"its {FIELD[missing].says} is {SUPPRESSED}" if values.get(missing) is None else None


def _one_row(kind: str, sub: str, r, tag: str) -> str:
    """The answer about one row: its kind's answer, or, for "no data" (asked as `sub`), that kind's "no data"
    answer."""
    spec = KIND[sub if kind == "no_data" else kind]
    values = row_values(r)
    vals = {k: v for k, v in values.items() if v is not None}
    horizon, state = HORIZON.get(r["earnings_horizon"]), r["state"]
    f = FIELD[spec.field]
    text = spec.no_data_answer if kind == "no_data" else spec.answer(sub)
    return text.format(
        tag=tag, name=row_name(r), horizon=horizon, state=state, suppressed=SUPPRESSED,
        earnings_label=_earnings_label(r) if horizon else "", **vals,
        label=f.label_for(horizon, state), bare_label=FIELD[suppressed_field(spec, values)].bare_label,
        value=vals.get(spec.field), missing=FIELD[suppressed_field(spec, values)].says)


def answer_text(kind: str, sub: str, recs: list[dict], cite: dict[str, int]) -> str:
    """The reference answer: the citation, the row named, each figure under its field's label."""
    r = recs[0]
    if kind == "no_data" or kind in KIND:
        return _one_row(kind, sub, r, f"[{cite[r['row_id']]}]")
    if kind == "open":
        parts = []
        for i, x in enumerate(sorted(recs, key=lambda x: cite[x["row_id"]])):
            v = row_values(x)["earnings"]
            label = _earnings_label(x) if v is not None else "Median earnings"
            value = v if v is not None else f"no data ({SUPPRESSED})"
            name = names_of(x)["full" if i == 0 else "credential"]
            parts.append(f"[{cite[x['row_id']]}] {name}. {label}: {value}.")
        return " ".join(parts)
    a, b = recs
    hi = a if a["earnings"] > b["earnings"] else b
    va, vb = row_values(a)["earnings"], row_values(b)["earnings"]
    by = "school" if sub == "schools" else "what"
    second = names_of(b)["at_school" if by == "school" else "what"]
    winner = winner_sentence(by, hi["credential_desc"], program_name(hi), hi["inst_name"])
    return (f"[{cite[a['row_id']]}] {row_name(a)}. {_earnings_label(a)}: {va}. [{cite[b['row_id']]}] {second}, "
            f"{_earnings_label(b).lower()}: {vb}. {winner}.")


def reference_for(kind: str, sub: str, recs: list[dict]) -> dict[str, Any]:
    """What eval scores a held-out answer by: the figure, the yes/no, the rows."""
    r = recs[0]
    if kind in KIND:
        spec = KIND[kind]
        columns = [FIELD[f].column for f in (spec.field, *spec.needs)]
        value = float(r[FIELD[spec.field].column])
        out = {"numeric": round(value, 2) if FIELD[spec.field].value == "ratio" else value,
               "source": row_source(r, *columns, *(["earnings_horizon"] if "earnings" in columns[:1] else []),
                                    *(["state"] if spec.score == "verdict" else []))}
        return out | ({"yes": value > 0} if spec.score == "verdict" else {})
    if kind == "no_data":
        field = suppressed_field(KIND[sub], row_values(r))
        return {"numeric": None, "source": row_source(r) | {"asked": sub, "suppressed": field}}
    if kind == "open":
        values = [float(x["earnings"]) for x in recs if not _missing(x["earnings"])]
        return {"numeric": None, "values": values, "source": row_source(r) | {"rows": [row_source(x) for x in recs]}}
    a, b = recs
    hi, lo = (a, b) if a["earnings"] > b["earnings"] else (b, a)
    return {"numeric": float(hi["earnings"]),
            "source": row_source(hi, "earnings") | {"compare_with": row_source(lo, "earnings")}}


def kind_for(asked: str, r) -> tuple[str, str]:
    """The dataset's (kind, sub) for a question asking for field `asked` about row r (`data.fields.KINDS`): its
    answer's form, and "no data" where the row lacks that field."""
    spec = KIND_OF_FIELD.get(asked, KIND["earnings"])
    value = row_values(r).get(spec.field)
    if value is None:
        return "no_data", spec.name
    sign = -1 if value.startswith("-") else 1
    return spec.name, next((s for s in spec.subs if VERDICT_SIGN.get(s) == sign), spec.name)


# ------------------------------------------------------------------------------------------ fixed replies
def credential_words(desc: str) -> str:
    """How a sentence names a credential ("bachelor's", "certificate")."""
    return SHORT_CREDENTIAL.get(desc, desc)


def no_row_reply(what: str, school: str, nearest: list[dict] | None = None) -> str:
    """The asked row isn't in the data ("no bachelor's in Criminal Justice for Vanderbilt University"); the rows the
    school lists instead follow, each cited [1], [2]... and named as what it is."""
    text = NO_ROW.format(what=what, school=school)
    if nearest:
        text += NO_ROW_NEAREST.format(listed=" ".join(f"[{i}] {row_name(r)}." for i, r in enumerate(nearest, 1)))
    return text


def unknown_school_reply(school: str) -> str:
    return UNKNOWN_SCHOOL.format(school=school)


def ambiguous_reply(name: str, candidates: list[tuple[str, str]], more: int = 0) -> str:
    """A name several schools share: each candidate (school, state), by state, and how many more there are."""
    listed = "; ".join(f"{school} ({state})" for school, state in sorted(candidates, key=lambda c: (c[1], c[0])))
    return AMBIGUOUS.format(name=name, listed=listed, more=f", and {more} more" if more else "")


def off_topic_reply(topic: str, school: str | None = None) -> str:
    return OFF_TOPIC.format(topic=topic, where=f" at {school}" if school else "", covers=covers())


def ask_program_reply(school: str) -> str:
    return ASK_PROGRAM.format(school=school)


def ask_school_reply(program: str) -> str:
    return ASK_SCHOOL.format(program=program)
