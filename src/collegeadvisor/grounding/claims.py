"""Claims in an advisor's answer and their check against the rows it cites.

An answer names its row with a citation "[n]" (the n-th retrieved passage) and each of its sentences names the
field a figure belongs to ("Median debt: $23,456"). Three kinds of claim are read from the text:
- a figure: a money amount, a number of three or more digits, a ratio or a percentage (1-2 digit integers such as
  the "4" of "4 years" are not figures); it belongs to the row cited last before it and to the field named last
  in its clause (FIELD_CUES, most specific first), or the field of the figure before it;
- a yes/no verdict right after the citation: whether graduates out-earn a typical high-school graduate, i.e. the
  sign of the row's earnings premium;
- "no data" for a field: the row must have that field suppressed; the reason it gives in a value slot ("Median debt:
  no data (...)") must be the row's (`no_data_note`);
- the row's name right after the citation ("[2] Master's Degree in Social Work at ..."): it must be one of the
  cited row's own names (`row_names`); another retrieved row's name quotes one row under another's name;
- a comparison's winner ("Graduates of X earn more", "The Bachelor's Degree in X pays more"): it must be the cited
  row with the higher median earnings.
A figure needs a citation before it: "(1)", "[I]" or "[1a]" are no citations (the figures after them cite nothing),
and with `expected` (the rows the question resolved to) the answer must cite those rows and no other Scorecard row.

`check` compares every claim with the cited row, field by field, and gives the verdict that eval scores and chat
and serve act on. `Rules` (grounding.rules) answers the same questions for a partial answer, one token at a time: generation uses it
(generate.GroundedDecoding) so that a figure, verdict or "no data" its row contradicts can't be written at all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

from collegeadvisor.data.fields import FIELDS, answer_cues
from collegeadvisor.data.scorecard import WINNER_FORMS, cited_names, read_row, row_title, winner_sentence
from collegeadvisor.data.scorecard_answers import no_data_note

# Figures as metrics and the checker read them: $12,345 / 12345 / 12.3k / $1.2 million / 0.19 / -$3,000 / 41%.
_SCALE = {"k": 1e3, "thousand": 1e3, "m": 1e6, "mil": 1e6, "mn": 1e6, "million": 1e6, "bn": 1e9, "billion": 1e9}
NUMBER = re.compile(
    r"(?<![\w.,$])(?P<neg>[-\u2212\u2013]?)(?P<cur>\$?)\s?(?P<neg2>-?)"
    r"(?>(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+))"
    r"(?:\s?(?P<suf>thousand|million|billion|mil|mn|bn|[kKmM])\b|(?![\w.]\d|\w))"
    r"(?P<pct>\s?%|\s(?:per\s?cent)\b)?(?P<usd>\s?(?:dollars|usd)\b)?",
    re.IGNORECASE,
)
_CIP = re.compile(r"\bCIP(?:\s*code)?\s*[:#]?\s*\d[\d.]*", re.IGNORECASE)
_YEAR = re.compile(r"(?:19|20)\d\d")
CITATION = re.compile(r"\[(\d{1,2})\]")
# What reads like a citation but isn't one: "[I]", "[a]", "[1a]", "[]", "[123]", "(1)", "(ii)", "(b)", "{1}" or a
# numbered line ("2. ..."). A figure after one cites nothing.
PSEUDO_CITATION = re.compile(
    r"\[(?!\d{1,2}\])[^\[\]\n]{0,12}\]|(?<!\w)\((?:\d{1,3}|[a-z]|(?=[ivx])x{0,3}(?:ix|iv|v?i{0,3}))\)|\{\d{1,3}\}"
    r"|^[ \t]*\d{1,2}[.)][ \t]", re.I | re.M)
# A comparison's winner, in the dataset's words: the school (two schools' same program) or the credential and program
# (two programs at one school).
WINNER_OPENING = {by: form.split(" {")[0] for by, form in WINNER_FORMS.items()}  # "Graduates of", "The"
# A winner sentence opens a sentence, as the dataset writes it: "The Rockefeller University ... whether it pays more"
# is no winner.
WINNER = re.compile("|".join(
    rf"(?:^|(?<=[.!?]\s)){re.escape(WINNER_OPENING[by])} (?P<{by}>[^\n]{{1,200}}?){re.escape(form.split('}')[1])}\b"
    for by, form in WINNER_FORMS.items()))
# Where a comparison's winner sentence opens, after two rows are cited: the winner's name is forced there.
WINNER_OPEN = re.compile(r"(?:^|(?<=[.!?]\s))(?P<opening>" + "|".join(map(re.escape, WINNER_OPENING.values()))
                         + r")(?P<rest>(?:\s[^.\n]*)?)$")
# A field's label (as the dataset writes it: its start, then up to a few words) and its colon: what follows is the
# field's value slot.
_SLOT = re.compile(r"\b(?:" + "|".join(re.escape(f.bare_label) for f in FIELDS) + r")(?:[ \t][^:.;\n]{1,60})?:[ \t]*(?=\S)")
_NAMED = re.compile(r"\[(\d{1,2})\]\s*(?:(?:yes|no|unknown)\.\s*)?", re.I)  # a citation, then the row's name
_NOTE = re.compile(r"no data \(([^()\n]*)\)")
NO_DATA_PHRASE = re.compile(
    r"\bno\s+(?:\w+\s+){0,2}(?:data|information|figures?|records?)\b"
    r"|\b(?:not|isn't|aren't|wasn't|weren't)\s+(?:\w+\s+)?(?:available|reported|published|disclosed)\b"
    r"|\bunavailable\b|\bsuppress(?:ed|ion)\b|\bwithheld\b"
    r"|\b(?:doesn't|does\s+not|don't|do\s+not)\s+(?:have|include|report|list)\s+(?:any\s+)?(?:\w+\s+){0,2}"
    r"(?:data|information|figures?)\b"
    r"|\b(?:insufficient|not\s+enough|too\s+little|lacks?)\s+(?:\w+\s+)?(?:data|information)\b"
    r"|\btoo\s+few\s+(?:graduates|completers|students)\b|\bcan(?:'t|not)\s+tell\b",
    re.IGNORECASE,
)
# The field a clause speaks of, most specific first ("high-school graduate earnings" is not "earnings"), and how a
# problem names it: `data.fields`.
FIELD_CUES = answer_cues()
FIELD_NAMES = {f.name: f.says for f in FIELDS}
_BOUNDARY = re.compile(r"[.;!?](?=\s)|\n")
_LEADING_VERDICT = re.compile(r"^\s*\[(\d{1,2})\]\s*(yes|no|unknown)\b", re.I)
YES_NO = {"yes": True, "no": False, "unknown": None}  # the opening verdict on the cited row's earnings premium
# "... so it passes the test": the verdict on the cited row's earnings premium, stated after its figures.
TEST_VERDICT = re.compile(r"\b(pass(?:es)?|fail(?:s)?) the test\b", re.I)
TEST_WORDS = {"pass": True, "passes": True, "fail": False, "fails": False}


@dataclass
class Figure:
    value: float
    money: bool
    percent: bool
    start: int
    end: int
    text: str

    @property
    def counts(self) -> bool:
        """A figure in the sense of the grounding rule (not a 1-2 digit integer such as a citation or "4 years")."""
        digits = re.sub(r"\D", "", self.text.split(".")[0])
        return self.money or self.percent or "." in self.text or len(digits) >= 3


def figures(text: str) -> list[Figure]:
    """Every figure in text, in order; a CIP code and a bare year are not figures."""
    text = _CIP.sub(lambda m: " " * len(m.group()), text or "")
    out = []
    for m in NUMBER.finditer(text):
        num, suf = m["num"], (m["suf"] or "").lower()
        if _YEAR.fullmatch(num) and not (m["cur"] or suf or m["pct"] or m["usd"]):
            continue
        value = float(num.replace(",", "")) * _SCALE.get(suf, 1.0)
        if not math.isfinite(value):
            continue
        if m["neg"] or m["neg2"]:
            value = -value
        money = bool(m["cur"] or m["usd"] or suf) or (abs(value) >= 1000 and not m["pct"])
        out.append(Figure(round(value, 6), money, bool(m["pct"]), m.start(), m.end(), m.group()))
    return out


def says_no_data(text: str | None) -> bool:
    return bool(NO_DATA_PHRASE.search(plain(text)))


def plain(text: str | None) -> str:
    """Typographic apostrophes as ASCII, so "doesn’t" reads as "doesn't"."""
    return (text or "").replace("\u2019", "'").replace("\u2018", "'")


def value_of(text: str) -> float:
    """The number a row's value text stands for ("-$1,234" -> -1234.0, "0.43" -> 0.43)."""
    return float(text.replace("$", "").replace(",", ""))


def same_value(figure: float, row_text: str) -> bool:
    """A figure states a row value: equal to it, or to its absolute value ("$235 less than"), at the row's precision."""
    v = value_of(row_text)
    places = len(row_text.split(".")[1]) if "." in row_text else 0
    return any(round(abs(figure) if sign else figure, places) == round(abs(v) if sign else v, places)
               for sign in (False, True))


def cue_field(text: str) -> str | None:
    """The most specific field named in a clause, or None."""
    for name, pattern in FIELD_CUES:
        if pattern.search(text):
            return name
    return None


def _counted(text: str) -> list[Figure]:
    """The figures the grounding rule holds to a row: `Figure.counts`, or any number in a field's value slot
    ("Completers: 45")."""
    return [f for f in figures(text) if (f.counts or _in_slot(text, f)) and not _in_citation(text, f)]


def _in_slot(text: str, f: Figure) -> bool:
    return text[:f.start].rstrip().endswith(":") and cue_field(text[max(0, f.start - 60):f.start]) is not None


def _in_citation(text: str, f: Figure) -> bool:
    return text[max(0, f.start - 1):f.start] == "[" and text[f.end:f.end + 1] == "]"


def field_at(text: str, pos: int | None = None) -> str | None:
    """The field a figure or "no data" at `pos` belongs to: the most specific cue in its clause (since the last
    sentence boundary, citation or figure), else the field of the figure before it in the same answer."""
    pos = len(text) if pos is None else pos
    before = text[:pos]
    marks = [m.end() for m in _BOUNDARY.finditer(before)] + [m.end() for m in CITATION.finditer(before)]
    earlier = [f for f in _counted(before) if f.end <= pos]
    start = max(marks + [earlier[-1].end if earlier else 0, 0])
    found = cue_field(before[start:])
    if found or not earlier:
        return found
    return field_at(text, earlier[-1].start)


def cited_at(text: str, pos: int) -> int | None:
    """The row index (1-based) cited last before pos, or None (also after a pseudo-citation such as "(2)" or "[II]"
    that follows the last citation)."""
    found = list(CITATION.finditer(text[:pos]))
    if not found:
        return None
    pseudo = [m for m in PSEUDO_CITATION.finditer(text[:pos], found[-1].end())]
    return None if pseudo else int(found[-1].group(1))


# ------------------------------------------------------------------------------------------ the context
@dataclass
class Context:
    """The retrieved passages of one question, each read back into its row (None for a passage that isn't one)."""

    passages: list[str]
    rows: list[dict | None] = field(init=False)

    def __post_init__(self):
        self.rows = [read_row(p) for p in self.passages]

    def row(self, n: int | None) -> dict | None:
        return self.rows[n - 1] if n is not None and 1 <= n <= len(self.rows) else None

    def values(self, n: int | None, name: str | None) -> list[str] | None:
        """Value texts a figure under row n and field `name` may state: the one value (empty when suppressed or
        not in the row), every value of the row when the field is unknown, the passage's own figures when row n is
        not a Scorecard row; nothing when no retrieved row is cited (a figure needs its citation)."""
        if n is None or not 1 <= n <= len(self.passages):
            return []
        row = self.row(n)
        if row is None:
            return [f.text.strip() for f in figures(self.passages[n - 1]) if f.counts]
        if name is None:
            return [v for v in row["values"].values() if v is not None]
        v = row["values"].get(name)
        return [] if v is None else [v]

    def premium_passes(self, n: int | None) -> bool | None:
        row = self.row(n)
        v = row["values"].get("premium") if row else None
        return None if v is None else not v.startswith("-")


# ------------------------------------------------------------------------------------------ the check
def claims(answer: str) -> list[dict[str, Any]]:
    """Claims in an answer: {"type": "figure"|"verdict"|"no_data"|"name"|"winner", "row", "field", "value", "text",
    "start"} ("winner" also carries "cited", the rows the answer cites)."""
    out: list[dict[str, Any]] = []
    lead = _LEADING_VERDICT.match(answer)
    if lead:
        out.append({"type": "verdict", "row": int(lead.group(1)), "field": "premium",
                    "value": YES_NO[lead.group(2).lower()], "text": lead.group(2), "start": lead.start(2)})
    for m in TEST_VERDICT.finditer(answer):
        out.append({"type": "verdict", "row": cited_at(answer, m.start()), "field": "premium",
                    "value": TEST_WORDS[m.group(1).lower()], "text": m.group(1), "start": m.start()})
    for f in _counted(answer):
        out.append({"type": "figure", "row": cited_at(answer, f.start), "field": field_at(answer, f.start),
                    "value": f.value, "text": f.text.strip(), "start": f.start})
    for m in NO_DATA_PHRASE.finditer(plain(answer)):
        out.append({"type": "no_data", "row": cited_at(answer, m.start()), "field": field_at(answer, m.start()),
                    "value": None, "text": m.group(), "start": m.start()})
    for m in _SLOT.finditer(answer):  # what follows a field's label: a "no data"'s reason, or neither a figure nor
        after, name, n = answer[m.end():], field_at(answer, m.end()), cited_at(answer, m.end())  # "no data"
        note = _NOTE.match(answer, m.end())
        if note is not None:  # "Median debt: no data (suppressed ...)"
            out.append({"type": "note", "row": n, "field": name, "value": note.group(1), "text": note.group(1),
                        "start": note.start(1)})
        elif not (NUMBER.match(after) or NO_DATA_PHRASE.match(plain(after)) or PSEUDO_CITATION.match(after)) \
                and name is not None and n is not None:  # "Completers: Seven"
            out.append({"type": "slot", "row": n, "field": name, "value": None, "text": re.split(r"[.;\n]", after)[0][:60],
                        "start": m.end()})
    for m in _NAMED.finditer(answer):
        named = answer[m.end():]
        out.append({"type": "name", "row": int(m.group(1)), "field": None, "value": named,
                    "text": named.split(". ")[0], "start": m.end()})
    cited = sorted({int(m.group(1)) for m in CITATION.finditer(answer)})
    for m in WINNER.finditer(answer):
        kind = "school" if m["school"] is not None else "what"
        out.append({"type": "winner", "row": None, "field": "earnings", "value": (kind, m[kind]), "text": m.group(),
                    "start": m.start(), "cited": cited})
    return sorted(out, key=lambda c: c["start"])


def row_names(row: dict) -> tuple[str, ...]:
    """Every way an answer may name a row read back from its document right after its citation
    (`data.scorecard.cited_names`)."""
    return cited_names(row["credential"], row["program"], row["school"])


def _misnamed(claim: dict, ctx: Context) -> str | None:
    """Why a cited row's name contradicts the citation: it is not one of the row's own names (another retrieved row's
    name, when it is one)."""
    n, text = claim["row"], claim["value"]
    row = ctx.row(n)
    if row is None or any(text.startswith(name) for name in row_names(row)):
        return None
    for m, other in enumerate(ctx.rows, 1):
        if other is not None and m != n:
            named = next((name for name in row_names(other) if text.startswith(name)), None)
            if named:
                return f"cites [{n}] but names row [{m}] ({named.rstrip('.,')})"
    said = text.split(".")[0][:60]
    return f"cites [{n}] but names it '{said}' (row [{n}] is {_title(row)})"


def _title(row: dict) -> str:
    return row_title(row["credential"], row["program"], row["school"])


def _citation_problem(claim: dict, ctx: Context, expected: set[int] | None) -> str | None:
    """Why a citation and the name after it are wrong: a row that wasn't retrieved or wasn't asked about, or a
    name that isn't the row's."""
    n = claim["row"]
    if not 1 <= n <= len(ctx.passages):
        return f"cites [{n}], but only {len(ctx.passages)} rows were retrieved"
    row = ctx.row(n)
    if expected is not None and n not in expected and row is not None:
        return f"cites [{n}] ({_title(row)}), which is not the row asked about"
    return _misnamed(claim, ctx)


def _winner_problem(claim: dict, ctx: Context) -> str | None:
    """Why a comparison's winner is wrong: it is not the cited row with the highest median earnings (ties allowed),
    it names no cited row, or a cited row has no earnings to compare."""
    rows = {n: ctx.row(n) for n in claim["cited"] if ctx.row(n) is not None}
    if not rows:
        return f"says '{claim['text']}' without citing the rows it compares"
    missing = [n for n, r in rows.items() if r["values"].get("earnings") is None]
    if missing:
        return f"says '{claim['text']}', but row [{missing[0]}] has no median earnings"
    kind = claim["value"][0]
    named = [n for n, r in rows.items() if winner_sentence(kind, r["credential"], r["program"], r["school"])
             == claim["text"]]
    top = max(value_of(r["values"]["earnings"]) for r in rows.values())
    best = next(n for n, r in rows.items() if value_of(r["values"]["earnings"]) == top)
    if not named:
        return f"says '{claim['text']}', which names none of the cited rows"
    if any(value_of(rows[n]["values"]["earnings"]) < top for n in named):
        return (f"says '{claim['text']}', but row [{best}] ({_title(rows[best])}) has the higher median earnings "
                f"({rows[best]['values']['earnings']})")
    return None


def winner_sentences(rows: dict[int, dict]) -> list[str]:
    """The winner sentences a comparison of `rows` (all with earnings) may say: each names a row with the top median
    earnings, and no row below the top has the same sentence (what `_winner_problem` accepts). Two schools' same
    program are named by school only; two programs at one school by credential and program only."""
    earn = {n: value_of(r["values"]["earnings"]) for n, r in rows.items()}
    top = max(earn.values())
    named: dict[str, list[int]] = {}  # each sentence, and the rows it names
    for by in WINNER_FORMS:
        for n, r in rows.items():
            named.setdefault(winner_sentence(by, r["credential"], r["program"], r["school"]), []).append(n)
    return [s for s, ns in named.items() if all(earn[n] == top for n in ns)]


def _problem(claim: dict, ctx: Context, expected: set[int] | None = None) -> str | None:
    """Why the context contradicts a claim, or None."""
    n, name = claim["row"], claim["field"]
    label = FIELD_NAMES.get(name, "a figure")
    if claim["type"] == "name":
        return _citation_problem(claim, ctx, expected)
    if claim["type"] == "winner":
        return _winner_problem(claim, ctx)
    if claim["type"] == "slot":
        return None if ctx.row(n) is None else f"writes '{claim['text']}' where row [{n}]'s {label} goes"
    if claim["type"] == "note":  # a true short form: "suppressed", as the row documents write it
        reason = no_data_note(name, ctx.row(n)["values"]) if ctx.row(n) is not None and name else None
        if reason is None or claim["value"] == reason or (claim["value"] == "suppressed" and "suppressed" in reason):
            return None
        return f"gives '{claim['text']}' as why row [{n}] has no {label}; the row's reason is '{reason}'"
    if n is not None and not 1 <= n <= len(ctx.passages):
        return f"cites [{n}], but only {len(ctx.passages)} rows were retrieved"
    row = ctx.row(n)
    if claim["type"] == "verdict":
        passes = ctx.premium_passes(n)
        if claim["value"] is None:
            return None if passes is None else f"says {claim['text']!r}, but row [{n}] has an earnings premium"
        if passes is None:
            return f"says {claim['text']!r}, but row [{n}] has no earnings premium"
        verdict = "passes" if passes else "fails"
        return None if passes == claim["value"] else f"says {claim['text']!r}, but row [{n}] {verdict} the test"
    if claim["type"] == "no_data":
        if row is None or name is None:
            return None
        value = row["values"].get(name)
        return None if value is None else f"says no data for the {label}, but row [{n}] has {value}"
    if n is None:
        return f"states {claim['text']} without citing its row"
    allowed = ctx.values(n, name)
    if any(same_value(claim["value"], v) for v in allowed or []):
        return None
    where = f"row [{n}]'s {label}" if row is not None and name else f"row [{n}]"
    if row is not None and name and row["values"].get(name, "absent") is None:
        return f"states {claim['text']} as {where}, which is suppressed (no data)"
    return f"states {claim['text']}, which is not {where}" + (f" ({allowed[0]})" if len(allowed or []) == 1 else "")


def check(answer: str, passages: Sequence[str] | Context, expected: Collection[int] | None = None) -> dict[str, Any]:
    """The verdict on an answer given its passages: status "verified" (every claim agrees with its cited row),
    "unverified" (each bad claim carries its "problem"), or "no_claims"; with the cited row indices. `expected`:
    the rows (1-based) the question resolved to; the answer must cite one of them and no other Scorecard row."""
    ctx = passages if isinstance(passages, Context) else Context(list(passages))
    wanted = None if expected is None else {int(i) for i in expected}
    found = claims(answer or "")
    for claim in found:
        claim["problem"] = _problem(claim, ctx, wanted)
    problems = [c["problem"] for c in found if c["problem"]]
    cited = sorted({int(m.group(1)) for m in CITATION.finditer(answer or "")})
    if wanted and found and not wanted.intersection(cited):
        problems.append(f"cites none of the rows asked about ({', '.join(f'[{i}]' for i in sorted(wanted))})")
    status = "unverified" if problems else ("verified" if any(c["type"] != "name" for c in found) else "no_claims")
    return {"status": status, "problems": problems, "cited": cited, "claims": found}


def forbidden(verdict: dict, before: dict | None = None) -> dict[str, list]:
    """What a retry must not say again (added to `before`): the offending figures, verdicts, "no data" slots and
    citations of a failed check (a figure that cited nothing, or a row's misspelt name, forbids nothing: decoding
    already holds both)."""
    out = {k: list(v) for k, v in (before or {"figures": [], "verdicts": [], "rows": [], "no_data": []}).items()}
    for claim in verdict["claims"]:
        if not claim.get("problem"):
            continue
        if claim["type"] == "figure" and claim["row"] is not None:
            out["figures"].append(digits(claim["text"]))
        elif claim["type"] == "verdict":
            out["verdicts"].append(claim["value"])
        elif claim["type"] == "no_data":
            out["no_data"].append(claim["field"])
        if claim["row"] is not None and claim["problem"].startswith("cites") and "names it" not in claim["problem"]:
            out["rows"].append(claim["row"])
    return out


def digits(text: str) -> str:
    return re.sub(r"\D", "", text.split(".")[0]) + ("." + re.sub(r"\D", "", text.split(".")[1]) if "." in text else "")


def fallback_answer(passages: Sequence[str], cited: Sequence[int], expected: Collection[int] | None = None) -> str:
    """The row's own facts under its name, said to be that: the answer when generation could not be verified. The
    row is a cited row that was asked about, else the first row asked about, else the first cited (or first) row;
    with `expected` given but none of its rows retrieved, no row."""
    valid = lambda i: 1 <= i <= len(passages)  # noqa: E731
    if expected is not None:
        asked = [i for i in expected if valid(i)]
        order = [i for i in cited if i in asked] + sorted(asked)
    else:
        order = [i for i in cited if valid(i)] + ([1] if passages else [])
    n = next(iter(order), None)
    if n is None:
        return ("I couldn't check an answer against the College Scorecard, so I won't guess. Name a school, a "
                "program and a credential, and I'll look them up.")
    row = read_row(passages[n - 1])
    name = row_names(row)[0] + " " if row is not None else ""
    return (f"I couldn't phrase a checked answer, so here is the College Scorecard row itself: [{n}] {name}"
            f"{passages[n - 1].strip()}")
