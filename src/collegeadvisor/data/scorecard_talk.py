"""The dataset's conversations as students write them (issue 21): its questions reworded the way people type, a
share turned into follow-ups, and the turns whose answer is a fixed reply.

- **Loose wording**: lowercase, the school as people write it ("uga", "u of iowa", "penn state"), the program by a
  short name or alias ("cs", "slp", "registered nursing"), the credential in slang ("bs", "masters", "phd"), now
  and then a typo. The answer is unchanged: it names the row by its own name.
- **Follow-ups**: a first turn about a row in the context, then "and at <school>?", "what about the masters?",
  "and <program>?" or "what about debt?"; the second answer is the example's own, about the row the follow-up means.
- **Fixed replies**, in advise's own words (`data.scorecard_answers`): a program or credential the school doesn't
  list (with what it lists instead), a school the data doesn't have, a name several schools share, a topic the
  data doesn't cover.

The served chain (advise) gives the model a standalone question and gives the fixed replies itself; these examples
are for where the model answers alone (an export run by llama.cpp or Ollama, retrieval by the last message).
Deterministic for a seed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np

from collegeadvisor.data.fields import KIND, KINDS, UNCOVERED, suppressed_field
from collegeadvisor.data.scorecard import nearest_rows, program_name, row_document, row_records, row_values
from collegeadvisor.data.scorecard_answers import (
    ambiguous_reply,
    answer_text,
    credential_words,
    kind_for,
    no_row_reply,
    off_topic_reply,
    question_text,
    row_source,
    templates,
    unknown_school_reply,
)
from collegeadvisor.data.scorecard_text import CREDENTIAL_SLANG, FOLLOW_UPS, LOOSE_TEMPLATES, alias_table

LOOSE_SHARE = 0.3  # of questions about rows: asked the way students type
FOLLOW_SHARE = 0.1  # of single-row examples: the second turn of a conversation
FIXED_MIX = {"no_row": 0.03, "unknown_school": 0.012, "ambiguous": 0.012, "off_topic": 0.02}  # of all examples
TYPO_SHARE = 0.25  # of loose questions: one word misspelled
SINGLE = {k.name for k in KINDS} | {"no_data"}
# Made-up school names: syllables that spell no school the table holds (checked against its words).
_ONSETS = ["br", "qu", "th", "v", "m", "d", "gl", "sk", "h", "w", "z", "pr", "fl", "c", "n"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["rn", "ll", "nd", "x", "m", "ck", "rst", "vel", "mere", "wick", "dale", "ton"]
_KINDS_OF_SCHOOL = ["University", "College", "State University", "Institute of Technology", "Community College"]


# ------------------------------------------------------------------------------------------ how students write names
def school_forms(name: str) -> list[str]:
    """Ways students write a school: lowercase, without "The" or "-Main Campus", "u of <state>", the part before a
    campus's dash, and the aliases (`aliases.json`) that name it."""
    low = name.lower()
    forms = {low, re.sub(r"^the ", "", low), re.sub(r"-main campus$", "", low)}
    forms |= {f.replace("university of ", "u of ") for f in forms if f.startswith("university of ")}
    forms |= {f[: -len(" university")] for f in forms if f.endswith(" state university")}
    forms |= {k for k, v in alias_table()["schools"].items() if name in ([v] if isinstance(v, str) else v)}
    return sorted(f for f in forms if f)


def program_forms(program: str) -> list[str]:
    """Ways students write a program: lowercase, the part before a comma, without ", General" or "and Related
    Services", and the aliases that name it."""
    low = program.lower()
    forms = {low, low.split(",")[0], re.sub(r",? general$", "", low), re.sub(r" and related services$", "", low)}
    forms |= {k for k, v in alias_table()["programs"].items() if program in ([v] if isinstance(v, str) else v)}
    return sorted(f.strip() for f in forms if len(f.strip()) > 1)


def typo(text: str, rng) -> str:
    """One word of 6 or more letters misspelled: two letters swapped, one dropped or one doubled."""
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) >= 6 and w.isalpha()]
    if not long:
        return text
    i = int(rng.choice(long))
    w, j = words[i], int(rng.integers(1, len(words[i]) - 2))
    swapped = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    op = int(rng.integers(3)) if swapped != w else 1 + int(rng.integers(2))  # "cc" swapped is no typo
    words[i] = (swapped, w[:j] + w[j + 1:], w[:j] + w[j] + w[j:])[op]
    return " ".join(words)


def loose_what(r, rng, typos: bool = True) -> str:
    """A row's credential and program as students write them ("cs bs", "masters in slp")."""
    program = str(rng.choice(program_forms(program_name(r))))
    if typos and rng.random() < TYPO_SHARE:
        program = typo(program, rng)
    slang = str(rng.choice(CREDENTIAL_SLANG.get(str(r["credential_desc"]), (str(r["credential_desc"]).lower(),))))
    return (f"{program} {slang}", f"{slang} in {program}", f"{slang} {program}")[int(rng.integers(3))]


def loose_school(r, rng) -> str:
    return str(rng.choice(school_forms(str(r["inst_name"]))))


def loose_question(kind: str, sub: str, recs: list[dict], rng) -> str:
    """An example's question as a student types it: its kind's loose templates, filled with loose names."""
    if kind in ("open", "compare"):
        text = str(rng.choice(LOOSE_TEMPLATES[kind if kind == "open" else sub]))
        a = recs[0]
        if kind == "open":
            return text.format(program=str(rng.choice(program_forms(program_name(a)))), school=loose_school(a, rng))
        b = recs[1]
        if sub == "schools":
            return text.format(what=loose_what(a, rng), school_a=loose_school(a, rng), school_b=loose_school(b, rng))
        return text.format(school=loose_school(a, rng), what_a=loose_what(a, rng), what_b=loose_what(b, rng))
    spec = KIND[sub if kind == "no_data" else kind]
    return str(rng.choice(spec.loose)).format(what=loose_what(recs[0], rng), school=loose_school(recs[0], rng))


def ask(kind: str, sub: str, recs: list[dict], rng, loose: bool) -> str:
    """A question about rows: templated as the dataset asks, or loose."""
    if loose:
        return loose_question(kind, sub, recs, rng)
    return question_text(kind, sub, recs, int(rng.integers(len(templates(kind, sub)))), rng)


def made_up_school(rng, taken: list[str]) -> str:
    """A school name the table doesn't hold: an invented word that no word of a school name is near (a fuzzy
    matcher would read a near one as a typo of a real school), then a kind of school."""
    from rapidfuzz import fuzz, process  # delayed: only this builder uses it in data

    while True:
        word = "".join(str(rng.choice(x)) for x in (_ONSETS, _VOWELS, _CODAS))
        if len(word) >= 4 and process.extractOne(word, taken, scorer=fuzz.ratio, score_cutoff=70) is None:
            return f"{word.capitalize()} {rng.choice(_KINDS_OF_SCHOOL)}"


# ------------------------------------------------------------------------------------------ examples
def _example(kind: str, turns: list[tuple[str, str]], context: list[dict], source: dict) -> dict[str, Any]:
    messages = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    return {"kind": kind, "messages": messages, "context": [row_document(r) for r in context],
            "source": source | {"talk": kind}}


def _cite(context: list[dict]) -> dict[str, int]:
    return {r["row_id"]: i for i, r in enumerate(context, 1)}


def _answerable(kind: str, sub: str, r) -> bool:
    """Whether the dataset's answer of (kind, sub) holds for row r: every field it states is there, and the field
    its "no data" answer says is missing is missing."""
    values = row_values(r)
    if kind == "no_data":
        return values.get(suppressed_field(KIND[sub], values)) is None
    spec = KIND[kind]
    return all(values.get(f) is not None for f in (spec.field, *spec.needs))


def _follow_up(ex: dict, recs: dict[int, dict], rng) -> dict | None:
    """The example as a conversation's second turn: first a question about a neighbour in its context (or another
    field of its row), then the follow-up that changes only what differs."""
    b, ctx = recs[ex["rows"][0]], [recs[i] for i in ex["ctx_rows"]]
    cite, asked = _cite(ctx), KIND[ex["sub"] if ex["kind"] == "no_data" else ex["kind"]]
    others = [r for r in ctx if r["row_id"] != b["row_id"]]
    rng.shuffle(others)
    for a in others:
        if str(a["unitid"]) != str(b["unitid"]) and program_name(a) == program_name(b) \
                and a["credential_desc"] == b["credential_desc"]:
            change = str(rng.choice(FOLLOW_UPS["school"])).format(school=loose_school(b, rng))
        elif str(a["unitid"]) == str(b["unitid"]) and program_name(a) == program_name(b):
            slang = str(rng.choice(CREDENTIAL_SLANG.get(str(b["credential_desc"]), ("degree",))))
            change = str(rng.choice(FOLLOW_UPS["credential"])).format(credential=slang)
        elif str(a["unitid"]) == str(b["unitid"]) and a["credential_desc"] == b["credential_desc"]:
            program = str(rng.choice(program_forms(program_name(b))))
            change = str(rng.choice(FOLLOW_UPS["program"])).format(program=program)
        else:
            continue
        kind, sub = kind_for(asked.field, a)
        if _answerable(kind, sub, a):
            break
    else:  # no neighbour differs in one thing: ask another field of the same row first
        fields = [k for k in KINDS if k.name != asked.name and row_values(b).get(k.field) is not None
                  and all(row_values(b).get(f) is not None for f in k.needs)]
        if not fields:
            return None
        first = fields[int(rng.integers(len(fields)))]
        a, change = b, str(rng.choice(asked.follow))
        kind, sub = kind_for(first.field, a)
    loose = rng.random() < LOOSE_SHARE
    first_turn = (ask(kind, sub, [a], rng, loose), answer_text(kind, sub, [a], cite))
    return _example("follow_up", [first_turn, (change, ex["answer"])], ctx, ex["source"])


def _no_row(ex: dict, recs: dict[int, dict], school_rows: list[dict], other: dict, rng) -> dict | None:
    """A program (or a credential) the school doesn't list: what it lists instead, each named as what it is."""
    r = recs[ex["rows"][0]]
    listed = {program_name(x) for x in school_rows}
    if program_name(other) in listed:  # the program is there: ask for a credential it lacks
        have = {str(x["credential_desc"]) for x in school_rows if program_name(x) == program_name(other)}
        lacking = [c for c in CREDENTIAL_SLANG if c not in have]
        if not lacking:
            return None
        other = other | {"credential_desc": lacking[int(rng.integers(len(lacking)))]}
    other = other | {"inst_name": r["inst_name"], "unitid": r["unitid"]}
    near = nearest_rows(school_rows, [program_name(other)], [str(other.get("credential_level"))],
                        {str(other["cip_code"])[:2]})
    what = f"{credential_words(str(other['credential_desc']))} in {program_name(other)}"
    reply = no_row_reply(what, str(r["inst_name"]), near)
    question = ask("earnings", "earnings", [other], rng, rng.random() < 0.5)
    return _example("no_row", [(question, reply)], near, row_source(r) | {"asked_program": program_name(other)})


def _asked_at(r, school: str, rng, loose: bool) -> str:
    """An earnings question about r's program and credential at a school written exactly as given."""
    if loose:
        return str(rng.choice(KIND["earnings"].loose)).format(what=loose_what(r, rng), school=school)
    text = question_text("earnings", "earnings", [r | {"inst_name": school}],
                         int(rng.integers(len(KIND["earnings"].questions))), rng)
    return text.replace(school[0].upper() + school[1:], school) if text.startswith(school[0].upper()) else text


def _unknown(ex: dict, recs: dict[int, dict], taken: list[str], rng) -> dict:
    """A school the data doesn't hold: the reply quotes the name as resolution reads it (lowercase)."""
    r = recs[ex["rows"][0]]
    school = made_up_school(rng, taken)
    written = school.lower() if rng.random() < 0.7 else school
    question = _asked_at(r, written, rng, rng.random() < 0.6)
    return _example("unknown_school", [(question, unknown_school_reply(school.lower()))],
                    [recs[i] for i in ex["ctx_rows"]], {"fake_school": school})


def _ambiguous(rows: list[dict], name: str, rng) -> dict:
    """A name two or three schools share: one row of each in the context, the reply lists them with their states."""
    question = _asked_at(rows[0], name.lower() if rng.random() < 0.6 else name, rng, rng.random() < 0.5)
    reply = ambiguous_reply(name.lower(), [(str(x["inst_name"]), str(x["state"])) for x in rows])
    return _example("ambiguous", [(question, reply)], rows, {"shared_name": name})


def _off_topic(ex: dict, recs: dict[int, dict], rng) -> dict:
    r = recs[ex["rows"][0]]
    topic = UNCOVERED[int(rng.integers(len(UNCOVERED)))]
    question = str(rng.choice(topic.questions)).format(school=loose_school(r, rng))
    return _example("off_topic", [(question, off_topic_reply(topic.name, str(r["inst_name"])))],
                    [recs[i] for i in ex["ctx_rows"]], row_source(r) | {"topic": topic.name})


def _shared(df, allowed: np.ndarray, rng):
    """Names two or three schools in different states share, each with one row per school of a program and
    credential at least two of them list (where one alone lists it, the name means that one)."""
    sub = df.iloc[allowed]
    units = sub.groupby("inst_name")["unitid"].nunique()
    rows_of = sub.groupby("inst_name").indices
    for name in rng.permutation(sorted(units[(units >= 2) & (units <= 3)].index)):
        by_program: dict[str, dict[str, int]] = defaultdict(dict)
        for i in allowed[rows_of[name]]:
            r = df.iloc[int(i)]
            by_program[f'{r["cip_desc"]}|{r["credential_desc"]}'].setdefault(str(r["unitid"]), int(i))
        states = [df.iloc[i]["state"] for i in allowed[rows_of[name]]]
        shared = [rows for rows in by_program.values() if len(rows) >= 2]
        if any(not isinstance(x, str) for x in states) or len(set(states)) < int(units[name]):
            continue  # a school without a state, or two in one: the reply couldn't tell them apart
        if shared:
            yield str(name), list(shared[int(rng.integers(len(shared)))].values())


def converse(df, examples: list[dict], allowed: np.ndarray, rng) -> list[dict]:
    """The examples with a share reworded loosely, a share made follow-ups, and a share replaced by fixed-reply
    turns (`FIXED_MIX`), the count unchanged. Rows come from `allowed` (the training rows) only."""
    grounded = [i for i, ex in enumerate(examples) if ex.get("ctx_rows") and ex["kind"] != "not_in_context"]
    recs = row_records(df, [r for i in grounded for r in (*examples[i]["rows"], *examples[i]["ctx_rows"])])
    single = [i for i in grounded if examples[i]["kind"] in SINGLE]
    order = [int(i) for i in rng.permutation(single)]
    counts = {k: round(share * len(examples)) for k, share in FIXED_MIX.items()}
    fixed, rest = order[:sum(counts.values())], order[sum(counts.values()):]
    follow = set(rest[:round(FOLLOW_SHARE * len(single))])

    unit_rows = df.iloc[allowed].groupby(df.iloc[allowed]["unitid"].astype(str)).indices
    taken = sorted({w for name in set(df["inst_name"].astype(str).str.lower()) for w in re.findall(r"[a-z]+", name)})
    shared = _shared(df, allowed, rng)
    out = list(examples)
    kinds = [k for k, n in counts.items() for _ in range(n)]
    for i, kind in zip(fixed, kinds):
        ex = examples[i]
        if kind == "no_row":
            r = recs[ex["rows"][0]]
            mine = df.iloc[allowed[unit_rows[str(r["unitid"])]]].to_dict("records")
            other = df.iloc[int(rng.choice(allowed))].to_dict()
            new = _no_row(ex, recs, mine, other, rng)
        elif kind == "unknown_school":
            new = _unknown(ex, recs, taken, rng)
        elif kind == "ambiguous":
            name, rows = next(shared, (None, []))
            new = _ambiguous(list(row_records(df, rows).values()), name, rng) if name else None
        else:
            new = _off_topic(ex, recs, rng)
        out[i] = new or ex
    questions = {ex.get("question") for ex in examples}  # a follow-up's first turn is no other example's question
    for i in grounded:
        ex = out[i]
        if "messages" in ex:
            continue
        if i in follow:
            new = _follow_up(ex, recs, rng)
            if new is not None and new["messages"][0]["content"] not in questions:
                questions.add(new["messages"][0]["content"])
                out[i] = new
        elif rng.random() < LOOSE_SHARE and ex["kind"] in SINGLE | {"open", "compare"}:
            asked = [recs[r] for r in ex["rows"]]
            out[i] = ex | {"question": loose_question(ex["kind"], ex["sub"], asked, rng), "loose": True}
    return out
