"""Answering the asked question: resolve the conversation, find the rows it names, decide, then generate.

The chain (docs/architecture.md), each step with one home:
1. resolve (`kb.resolve.resolve_conversation`): school, program, credential, state and field, over the whole
   conversation, against the Scorecard's own names;
2. find (`find`): the rows the resolution names (both sides of a comparison), from the table;
3. decide (`plan`): the asked row exists -> the model answers it from that row alone (prompts of ~205 tokens
   instead of ~363 with retrieval's neighbours after it; BENCHMARKS.md, "Engines"); the school lacks that program or credential, or isn't in the data -> say so, naming what the
   school does list; a name fits several schools -> ask which, with their states; a topic the data doesn't hold
   -> say what it covers;
4. generate (`respond`, through `generate.answer`): under the constraint, from a standalone question in the
   dataset's own words (so a follow-up, slang or an instruction in the user's text never reaches the model as
   data), citing only the asked rows;
5. check (`grounding.check` with the asked rows as `expected`), retry, else the dataset's own answer for the row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Sequence

from collegeadvisor import grounding
from collegeadvisor.data.fields import KIND
from collegeadvisor.data.scorecard import load_table, nearest_rows, program_name, row_document, row_metadata
from collegeadvisor.data.scorecard_answers import (
    ambiguous_reply,
    answer_text,
    ask_program_reply,
    ask_school_reply,
    credential_words,
    kind_for,
    no_row_reply,
    off_topic_reply,
    question_text,
    unknown_school_reply,
)
from collegeadvisor.generate import answer
from collegeadvisor.kb import Retriever
from collegeadvisor.kb.resolve import Resolution, compare_cue, resolve_conversation

NEAREST = 3  # rows a "not in the data" answer offers instead
CANDIDATES = 8  # schools listed when a name fits several
LEVEL_ORDER = ["3", "5", "2", "6", "7", "1", "8", "4", "99"]  # an open credential: the rows shown first
FIXED_STATUS = {"no_row": "verified", "unknown_school": "verified", "off_topic": "verified",
                "ambiguous": "no_claims", "ask_program": "no_claims", "ask_school": "no_claims"}


@dataclass
class Plan:
    """What one conversation gets: a fixed reply, or a question for the model with the rows to answer from."""
    decision: str  # answer | open | compare | no_row | unknown_school | ambiguous | off_topic | ask_* | retrieval
    resolution: Resolution
    hits: list[dict] = field(default_factory=list)  # passages, the asked rows first
    expected: list[int] = field(default_factory=list)  # 1-based indices of the asked rows among hits
    question: str | None = None  # the standalone question the model answers
    reply: str | None = None  # a fixed reply
    kind: tuple[str, str] | None = None  # the dataset's (kind, sub) for the answer's form
    rows: list[dict] = field(default_factory=list)  # the asked rows' table records
    why: str = ""  # what is missing or ambiguous, said in the response

    @property
    def passages(self) -> list[str]:
        return [h["document"] for h in self.hits]

    def describe(self) -> dict[str, Any]:
        """What serve, chat and eval show of the resolution."""
        r = self.resolution
        return {"decision": self.decision, "why": self.why,
                "schools": [{"text": s.text, "candidates": [{"unitid": u[0], "name": u[1], "state": u[2]}
                                                            for u in s.units[:CANDIDATES]]} for s in r.schools],
                "programs": [list(p) for p in r.programs], "credential_levels": list(r.levels),
                "field": r.field or "earnings", "state": r.state, "off_topic": r.off_topic,
                "unknown_school": r.unknown_school, "rows": [str(x["row_id"]) for x in self.rows]}


# ------------------------------------------------------------------------------------------ the table
@lru_cache(maxsize=1)
def _by_unit() -> dict[str, list[int]]:
    table = load_table()
    return {str(k): list(v) for k, v in table.groupby(table["unitid"].astype(str)).indices.items()}


def _records(unitid: str) -> list[dict]:
    table = load_table()
    return [table.iloc[i].to_dict() for i in _by_unit().get(unitid, [])]


def hit_of(record: dict) -> dict:
    """A table row as retrieval returns one."""
    return {"id": str(record["row_id"]), "document": row_document(record), "metadata": row_metadata(record),
            "distance": 0.0}


def credential_phrase(levels: Sequence[str]) -> str:
    """How a sentence names the asked credential ("bachelor's", "certificate")."""
    table = load_table()
    found = table.loc[table["credential_level"].astype(str) == str(levels[0]), "credential_desc"] if levels else []
    desc = str(found.iloc[0]) if len(found) else "degree"
    return credential_words(desc) if len(levels) == 1 else "credential"


# ------------------------------------------------------------------------------------------ finding rows
def find(unitid: str, programs: Sequence[str], levels: Sequence[str]) -> tuple[list[dict], str | None]:
    """(the rows of a school that a program and credential name, why there are none): the first candidate
    program the school lists, at the asked credential levels (any, where none is asked)."""
    rows = _records(unitid)
    offered = [p for p in programs if any(program_name(r) == p for r in rows)]
    if not offered:
        return [], "program"
    at_level = [p for p in offered if any(program_name(r) == p and str(r["credential_level"]) in set(levels)
                                          for r in rows)]
    mine = [r for r in rows if program_name(r) == (at_level or offered)[0]]
    if levels:
        at = [r for r in mine if str(r["credential_level"]) in set(levels)]
        if not at:
            return [], "credential"
        mine = at
    def order(r):  # rows with earnings first (an open question asks what graduates earn), then the usual levels
        level = str(r["credential_level"])
        return (r["earnings"] != r["earnings"], LEVEL_ORDER.index(level) if level in LEVEL_ORDER else 99)

    return sorted(mine, key=order), None


def nearest(unitid: str, programs: Sequence[str], levels: Sequence[str], n: int = NEAREST) -> list[dict]:
    """What a school lists instead (`data.scorecard.nearest_rows`)."""
    table = load_table()
    families = {str(c)[:2] for c in table.loc[table["cip_desc"].str.rstrip(".").isin(list(programs)), "cip_code"]}
    return nearest_rows(_records(unitid), programs, levels, families, n)


# ------------------------------------------------------------------------------------------ deciding
def _ask(res: Resolution, decision: str, reply: str, why: str) -> Plan:
    return Plan(decision, res, reply=reply, why=why)


def _fixed(res: Resolution) -> Plan | None:
    """The decisions that need no row: a topic the data doesn't hold, a school it doesn't, a name several share."""
    where = res.schools[0].units[0][1] if res.schools and len(res.schools[0].units) == 1 else None
    if res.off_topic:
        return _ask(res, "off_topic", off_topic_reply(res.off_topic, where), f"the data does not cover {res.off_topic}")
    if res.unknown_school:
        return _ask(res, "unknown_school", unknown_school_reply(res.unknown_school),
                    f"no school named {res.unknown_school!r}")
    for school in res.schools:
        if len(school.units) > 1 and res.programs:  # the one of them that has the asked row is the one meant
            having = tuple(u for u in school.units if find(u[0], res.programs[0], res.levels)[0])
            school.units = having if len(having) == 1 else school.units
        if len(school.units) > 1:
            reply = ambiguous_reply(school.text, [(u[1], u[2]) for u in school.units[:CANDIDATES]],
                                    max(0, len(school.units) - CANDIDATES))
            return _ask(res, "ambiguous", reply, f"{school.text!r} fits {len(school.units)} schools")
    if res.schools and not res.programs:
        name = res.schools[0].units[0][1] if res.schools[0].units else res.schools[0].text
        return _ask(res, "ask_program", ask_program_reply(name), "no program named")
    if res.programs and not res.schools:
        return _ask(res, "ask_school", ask_school_reply(res.programs[0][0]), "no school named")
    return None


def _missing(res: Resolution, unitid: str, name: str, why: str, retrieve_rows: list[dict] | None = None) -> Plan:
    """The asked row isn't in the data: say so, then name what the school lists instead, each as what it is."""
    program = res.programs[0][0]
    what = f"{credential_phrase(res.levels)} in {program}" if res.levels else f"{program} program"
    near = nearest(unitid, res.programs[0], res.levels)
    return Plan("no_row", res, hits=[hit_of(r) for r in near], reply=no_row_reply(what, name, near),
                why=f"{name} has no row for {what}" + (" (the credential)" if why == "credential" else ""))


def _with_neighbours(rows: list[dict], question: str, retrieve: Retriever | None, k: int) -> list[dict]:
    hits = [hit_of(r) for r in rows]
    if retrieve is not None and len(hits) < k:
        asked = {h["id"] for h in hits}
        hits += [h for h in retrieve(question) if h["id"] not in asked][: k - len(hits)]
    return hits


def _model_plan(res: Resolution, decision: str, kind: tuple[str, str], rows: list[dict],
                retrieve: Retriever | None, k: int) -> Plan:
    spec = KIND.get(kind[1] if kind[0] == "no_data" else kind[0])
    template = spec.model_template if spec else 0  # the dataset template the model is asked in
    question = question_text(kind[0], kind[1], rows, template, random.Random(0))
    hits = _with_neighbours(rows, question, retrieve, k)
    return Plan(decision, res, hits=hits, expected=list(range(1, len(rows) + 1)), question=question, kind=kind,
                rows=rows)


def _single(res: Resolution, unitid: str, name: str, retrieve: Retriever | None, k: int) -> Plan:
    rows, why = find(unitid, res.programs[0], res.levels)
    if not rows:
        return _missing(res, unitid, name, why or "program")
    asked = res.field or "earnings"
    if len(rows) > 1 and asked == "earnings":
        return _model_plan(res, "open", ("open", "open"), rows[:k], retrieve, k)
    return _model_plan(res, "answer", kind_for(asked, rows[0]), rows[:1], retrieve, k)


def _shared_level(pairs: list[tuple[str, str, Sequence[str], tuple]]) -> tuple[str, ...]:
    """A comparison's credential where none is said: the first (bachelor's first) that both sides list."""
    sides = [{str(r["credential_level"]) for r in find(u, programs, ())[0]} for u, _, programs, _ in pairs]
    shared = [lv for lv in LEVEL_ORDER if all(lv in s for s in sides)]
    return (shared[0],) if shared else ()


def _compare(res: Resolution, pairs: list[tuple[str, str, Sequence[str], tuple]], sub: str,
             retrieve: Retriever | None, k: int) -> Plan:
    """Two rows side by side: (unitid, school name, programs, credential levels) each; a side the data lacks is
    said to be missing."""
    shared = () if all(lv for *_, lv in pairs) else _shared_level(pairs)
    pairs = [(u, name, programs, lv or shared) for u, name, programs, lv in pairs]
    found = [find(u, programs, levels) for u, _, programs, levels in pairs]
    rows = [f[0][0] for f in found if f[0]]
    missing = [(name, programs, levels) for (u, name, programs, levels), f in zip(pairs, found) if not f[0]]
    if missing:
        said = " ".join(no_row_reply(f"{credential_phrase(lv) + ' in ' if lv else ''}{programs[0]}", name)
                        for name, programs, lv in missing)
        if not rows:
            return Plan("no_row", res, reply=said, why="neither side is in the data")
        kind = kind_for("earnings", rows[0])
        text = answer_text(kind[0], kind[1], rows, {str(rows[0]["row_id"]): 1})
        return Plan("no_row", res, hits=[hit_of(rows[0])], expected=[1], rows=rows, kind=kind,
                    reply=f"{said} So I can't compare the two; the other side: {text}",
                    why=f"{missing[0][0]} has no such row")
    if any(kind_for("earnings", r)[0] == "no_data" for r in rows):
        cite = {str(r["row_id"]): i for i, r in enumerate(rows, 1)}
        texts = [answer_text(*kind_for("earnings", r), [r], cite) for r in rows]
        return Plan("compare", res, hits=[hit_of(r) for r in rows], expected=[1, 2], rows=rows,
                    reply=" ".join(texts) + " With one side's earnings suppressed, the data can't say which pays more.",
                    why="one side's earnings are suppressed")
    return _model_plan(res, "compare", ("compare", sub), rows, retrieve, k)


def plan(messages: Sequence[dict], retrieve: Retriever | None = None, k: int = 3, neighbours: bool = False) -> Plan:
    """What to answer the conversation's last user turn with (see the module). The model reads only the rows asked
    about (a share of the training contexts has that shape: data.scorecard_qa.ASKED_ONLY_SHARE); `neighbours` pads
    them with retrieved ones up to k, the shape of the rest (bench/engine_bench.py --neighbours measures it).
    Retrieval itself answers what resolves to no row."""
    res = resolve_conversation(list(messages))
    near = retrieve if neighbours else None
    last = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
    fixed = _fixed(res)
    if fixed is not None:
        return fixed
    if not res.schools:  # nothing named that resolves: retrieval reads the question as it is
        hits = list(retrieve(last)) if retrieve is not None and last.strip() else []
        return Plan("retrieval", res, hits=hits, why="no school or program resolved")
    units = [(s.units[0][0], s.units[0][1]) for s in res.schools]
    if len(units) >= 2:
        return _compare(res, [(u, n, res.programs[0], res.levels) for u, n in units[:2]], "schools", near, k)
    if len(res.programs) >= 2 and compare_cue(last):
        levels = [lv or res.levels for lv in res.program_levels[:2]]
        return _compare(res, [(units[0][0], units[0][1], p, lv) for p, lv in zip(res.programs[:2], levels)],
                        "programs", near, k)
    return _single(res, units[0][0], units[0][1], near, k)


# ------------------------------------------------------------------------------------------ answering
def model_messages(p: Plan, messages: Sequence[dict]) -> list[dict]:
    """What the model reads: the standalone question where the rows were resolved, else the conversation."""
    return [{"role": "user", "content": p.question}] if p.question else [dict(m) for m in messages]


def fixed_result(p: Plan) -> dict:
    """A fixed reply as `generate.answer` returns a generated one, checked against its rows."""
    verdict = grounding.check(p.reply or "", p.passages, expected=p.expected or None)
    if verdict["status"] != "unverified":
        verdict["status"] = FIXED_STATUS.get(p.decision, verdict["status"])
    return {"text": p.reply or "", "raw": p.reply or "", "ids": [], "stopped": True, "n_tokens": 0,
            "grounding": verdict | {"fixed": True}, "raw_grounding": verdict}


def unanswered(p: Plan, verdict: dict) -> str | None:
    """What a checked answer leaves out of what was asked, or None: a premium question's verdict (Yes / No /
    Unknown), the asked field's figure or "no data" for the asked row, every asked row's earnings for an open
    question, the winner of a comparison. A verified answer about the right row that says something else (its
    earnings for a premium question) is no answer to the question."""
    if not p.kind or not p.rows:
        return None
    kind, sub = p.kind
    claims = [c for c in verdict.get("claims") or [] if not c.get("problem")]
    stated = lambda row, types, fields: any(  # noqa: E731
        c["row"] == row and c["type"] in types and (fields is None or c["field"] in fields) for c in claims)
    if kind == "compare":
        return None if any(c["type"] == "winner" for c in claims) else "which of the two earns more"
    if kind == "open":
        missing = [i for i in p.expected if not stated(i, ("figure", "no_data"), ("earnings",))]
        return f"the earnings of row [{missing[0]}]" if missing else None
    spec = KIND[sub if kind == "no_data" else kind]
    if spec.score == "verdict":
        return None if stated(1, ("verdict",), None) else "the verdict (Yes, No or Unknown)"
    fields = None if kind == "no_data" else (spec.field,)
    return None if stated(1, ("figure", "no_data") if kind != "no_data" else ("no_data",), fields) \
        else f"the {spec.field} asked"


def finish(p: Plan, result: dict) -> dict:
    """A generated answer that failed its check after every retry, or that leaves out what was asked
    (`unanswered`), becomes the dataset's own answer for the asked rows (the form the model was trained to write),
    checked like any other. An answer to a question that resolved to no row is "unresolved" at best: its figures
    match the rows it cites, but nothing says those are the rows meant."""
    verdict = result.get("grounding") or {}
    if p.decision == "retrieval" and verdict.get("status") == "verified":  # its rows may not be the ones meant
        return result | {"grounding": verdict | {"status": "unresolved"}}
    left_out = unanswered(p, verdict) if verdict.get("status") == "verified" else None
    if not (verdict.get("fallback") or left_out) or not p.kind or not p.rows:
        return result
    cite = {str(r["row_id"]): i for i, r in enumerate(p.rows, 1)}
    text = answer_text(p.kind[0], p.kind[1], p.rows, cite)
    return result | {"text": text, "grounding": grounding.check(text, p.passages, expected=p.expected)
                     | {"fallback": True, "attempts": verdict.get("attempts")}
                     | ({"left_out": left_out} if left_out else {})}


def respond(model, tokenizer, conversations: Sequence[Sequence[dict]], retrieve: Retriever | None, k: int = 3,
            **gen) -> list[tuple[Plan, dict]]:
    """Plans and their results for many conversations: fixed replies as they are, the rest generated together."""
    plans = [plan(c, retrieve, k) for c in conversations]
    todo = [i for i, p in enumerate(plans) if p.reply is None]
    results: dict[int, dict] = {i: fixed_result(p) for i, p in enumerate(plans) if p.reply is not None}
    if todo:
        out = answer(model, tokenizer, [model_messages(plans[i], conversations[i]) for i in todo],
                     [plans[i].passages if retrieve is not None or plans[i].question else None for i in todo],
                     expected=[plans[i].expected or None for i in todo], **gen)
        results.update({i: finish(plans[i], r) for i, r in zip(todo, out)})
    return [(p, results[i]) for i, p in enumerate(plans)]
