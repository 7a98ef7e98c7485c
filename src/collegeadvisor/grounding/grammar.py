"""The grounding rules as a per-request grammar (`gbnf`), for engines that take one instead of a logits processor:
llama.cpp's server (`grammar`, GBNF) and vLLM's structured outputs (xgrammar reads the same text).

`Rules` (grounding.rules) holds a partial answer to the rows it cites one token at a time; a grammar can't read an
answer back, so it holds the same claims by where they may be written (`claims.check` is what the grammar answers):

    root   ::= fixed | answer | fixed block+   (answer alone where `expected` names rows: they must be cited)
    answer ::= first block* | a comparison: each of two or three rows with earnings cited once, then its winner
    first  ::= "[i] " verdict? name body        (i: a row asked about, `expected`, or any citable passage)
    block  ::= "[j] " name body                  (j: a citable passage)

- A citation is only "[n]" of a citable passage ("[I]", "(1)", "[7]" can't be written: free text has no digits and
  no brackets); with `expected`, a Scorecard row not asked about is not citable (as in `Rules`).
- The verdict ("Yes." / "No." / "Unknown.") only opens the answer, and only the one the row's earnings premium
  supports; the name after a citation is one of the row's own (`cited_names`).
- A row's body is free text and slots. Free text has no digits, "$", "[", "]" or "(", so every figure is a slot's:
  a field's label at the start of a clause (after the name, or ". " / "; " / "! " / "? ") then ": " and the row's
  value for that field as its document writes it, or "no data" (and the row's reason, `no_data_note`) where the row has no value. The check
  reads a figure's field from its clause, which holds nothing before the label. "passes the test" / "fails the test"
  is a slot too: only the one the row's premium supports.
- Free text can't state a claim the check reads outside a slot: no word that ends a "no data" phrase ("data",
  "suppressed", "tell", ...), no "pass(es)" / "fail(s)" (the test's verdict), no "pays", "Graduates" or "The" (a
  comparison's winner is read from "The ... pays more" / "Graduates of ... earn more"), no "(" (a pseudo-citation
  "(a)" / "(iv)", after which figures cite nothing).
- A comparison: two or three rows with earnings, each cited once, then ". " and the winner sentence ("Graduates of
  X earn more", "The X pays more"): one that names the cited row with the higher median earnings (ties: either) and
  no cited row below it.
- A passage that isn't a Scorecard row (the user's own files) is cited with no name; its body may state its own
  figures (as `Context.values` admits them), after a space or a mark.
- `fixed`: an answer that cites nothing and states no figure ("The retrieved College Scorecard rows don't cover
  ..."): free text with no digits, "$", brackets, verdict or winner.

A row costs about 1.5 KB of grammar and the shared word rules about 5 KB: 3 rows come to about 10 KB, which xgrammar
compiles in about 10 ms without a vocabulary and in a few tenths of a second against a 49k-token one.
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import combinations, permutations
from typing import Collection, Sequence

from collegeadvisor.data.fields import FIELD, FIELDS
from collegeadvisor.data.scorecard import NO_DATA, cited_names
from collegeadvisor.data.scorecard_answers import no_data_note
from collegeadvisor.grounding.claims import Context, cue_field, figures, value_of, winner_sentences

# Words free text may not hold. A "no data" phrase (claims.NO_DATA_PHRASE) ends in one of the first; the test's
# verdict (claims.TEST_VERDICT) opens with one of the second; a comparison's winner (claims.WINNER, case-sensitive)
# needs "pays" or "Graduates". Words are maximal runs of ASCII letters; the check's are \w runs, which hold them.
NO_DATA_WORDS = ("data", "information", "figure", "figures", "record", "records", "available", "unavailable",
                 "reported", "published", "disclosed", "suppressed", "suppression", "withheld", "few", "tell")
CLAIM_WORDS = ("pass", "passes", "fail", "fails", "pays")
CASED_WORDS = ("Graduates", "The")  # WINNER is case-sensitive: "graduates", "the" stay free
FIXED_CASED = ("Graduates",)  # an answer with no citation may open with "The"
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Free text's characters besides letters: whitespace, what ends a clause (claims._BOUNDARY), and the rest of ASCII
# punctuation but "$[]("; non-ASCII Latin letters and typographic punctuation, less the three that Python's re.I
# folds onto ASCII letters (U+0130, U+0131, U+017F: "ſuppressed" reads as "suppressed").
_WS = r"[ \t\n]"
_STOP = r"[.;!?]"
_OTHER = r"[\"#%&'*+,\-/:<=>@\\^_`{|}~)\u00a0-\u012f\u0132-\u017e\u0180-\u024f\u2010-\u2027]"
CANT_TELL = ", so the Scorecard can't tell whether it pays more than a high-school diploma"
VERDICT_TEXT = {True: "Yes", False: "No", None: "Unknown"}


# ------------------------------------------------------------------------------------------ text
def lit(text: str) -> str:
    """A GBNF string literal."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif ord(c) < 32 or ord(c) > 126:
            out.append(f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _capital(text: str) -> str:
    """A literal whose first letter may be either case ("[Mm] \"edian debt\"")."""
    head = text[:1]
    if head.lower() == head.upper():
        return lit(text)
    return f"[{head.upper()}{head.lower()}] " + lit(text[1:]) if text[1:] else f"[{head.upper()}{head.lower()}]"


def _letter_class(chars: set[str]) -> str:
    """A class of ASCII letters, as ranges ("[a-ce-zA-CE-Z]")."""
    codes, parts = sorted(ord(c) for c in chars), []
    start = prev = None
    for c in codes + [None]:
        if c is not None and prev is not None and c == prev + 1 and chr(c).islower() == chr(prev).islower():
            prev = c
            continue
        if start is not None:
            parts.append(chr(start) if start == prev else f"{chr(start)}-{chr(prev)}")
        start = prev = c
    return "[" + "".join(parts) + "]"


# ------------------------------------------------------------------------------------------ words
def _numbered(keys: dict) -> dict:
    """Each key's value replaced by its class's number (in order of first appearance)."""
    ids: dict = {}
    return {k: ids.setdefault(v, len(ids)) for k, v in keys.items()}


@lru_cache(maxsize=4)
def _word_rules(name: str, words: tuple[str, ...], cased: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Rules for one word (a run of ASCII letters) that is none of `words` (any case) nor `cased` (as written):
    a minimal automaton over letters, one rule a state; `name` is its start."""
    spelled = [[{c.lower(), c.upper()} for c in w] for w in words] + [[{c} for c in w] for w in cased]
    start = frozenset((i, 0) for i in range(len(spelled)))
    dead = frozenset()
    states, todo, moves = {start: 0}, [start], {}
    while todo:
        s = todo.pop()
        for ch in _LETTERS:
            t = frozenset((i, p + 1) for i, p in s if p < len(spelled[i]) and ch in spelled[i][p])
            moves[s, ch] = t
            if t not in states:
                states[t] = len(states)
                todo.append(t)
    ends = {s: s != start and not any(p == len(spelled[i]) for i, p in s) for s in states}
    # Moore's refinement: states with one future become one rule
    block = _numbered({s: (ends[s], s == dead) for s in states})
    while True:
        sig = _numbered({s: (block[s], tuple(block[moves[s, ch]] for ch in _LETTERS)) for s in states})
        if len(set(sig.values())) == len(set(block.values())):
            break
        block = sig
    ids: dict = {}
    for s in sorted(states, key=lambda s: states[s]):
        ids.setdefault(block[s], len(ids))
    rule = {s: name if block[s] == block[start] else f"{name}{ids[block[s]]}" for s in states}
    rule[dead] = f"{name}-any"
    out, done = [f"{name}-any ::= [a-zA-Z]*"], {rule[dead]}
    for s in sorted(states, key=lambda s: states[s]):
        if rule[s] in done:
            continue
        done.add(rule[s])
        by_target: dict[str, set[str]] = {}
        for ch in _LETTERS:
            by_target.setdefault(rule[moves[s, ch]], set()).add(ch)
        alts = [f"{_letter_class(chars)} {target}" for target, chars in by_target.items()]
        out.append(f"{rule[s]} ::= " + " | ".join(alts + (['""'] if ends[s] else [])))
    return tuple(out)


# ------------------------------------------------------------------------------------------ rows
def _label(passage: str, name: str) -> str | None:
    """A field's label as the row's document writes it ("Median earnings four years after completion")."""
    bare = FIELD[name].bare_label
    m = re.search(rf"(?<=\. ){re.escape(bare)}(?: [^:.]{{1,60}})?(?=: )", passage)
    return m.group() if m else None


def _labels(passage: str, name: str) -> list[str]:
    """The labels a field's slot opens with: the document's, and the label before its placeholder ("Median
    earnings", "High-school graduate earnings": how "no data" is written); the ratio's answer's, too."""
    doc = _label(passage, name) or FIELD[name].bare_label
    more = [FIELD[name].bare_label.removesuffix(" in")] + (["Debt-to-earnings ratio"] if name == "ratio" else [])
    return list(dict.fromkeys([doc, *more]))


def _value(name: str, row: dict, passage: str) -> str:
    """What may follow a field's label and ": " in a row's body: its value as the document writes it, else "no data"
    and its notes."""
    values = row["values"]
    v = values.get(name)
    if v is not None:
        if name != "ratio" or values.get("debt") is None or values.get("earnings") is None:
            return lit(v)
        # the ratio's answer: "0.43 (median debt $23,456 against median earnings $54,321 four years after completion)"
        said = f" (median debt {values['debt']} against median earnings {values['earnings']}"
        horizon = (_label(passage, "earnings") or "")[len(FIELD["earnings"].bare_label):]
        return f"{lit(v)} ({lit(said)} {lit(horizon)}? \")\")?" if horizon else f"{lit(v)} {lit(said + ')')}?"
    note = no_data_note(name, values)  # the row's reason: "no data (its median debt is suppressed ...)"
    said = f" (\" (\" {lit(note)} \")\")?" if note else ""
    tell = f" {lit(CANT_TELL)}?" if name in ("earnings", "premium") else ""
    return f"{lit(NO_DATA)}{said}{tell}"


def _slots(row: dict, passage: str) -> dict[str, str]:
    """Each field's label then ": " and what may follow it, by field."""
    out = {}
    for f in FIELDS:
        heads = " | ".join(_capital(label) for label in _labels(passage, f.name))
        out[f.name] = f"({heads}) \": \" {_value(f.name, row, passage)}"
    return out


def _verdict_slot(row: dict | None) -> str | None:
    """ "passes the test" / "fails the test", as the row's premium says; none without a premium."""
    v = None if row is None else row["values"].get("premium")
    if v is None:
        return None
    return '[fF] "ail" "s"? " the test"' if v.startswith("-") else '[pP] "ass" "es"? " the test"'


def _body(p: str, slots: str | None, verdict: str | None, figures_: str | None) -> list[str]:
    """A block's body after its citation and name, as rules `p`-a (a clause's start: a slot, rule `slots`, may open
    here), `p`-m (after a space or mark) and `p`-x (after a word or value: no letter next, so a word is whole and
    can't run on into an excluded one). The test's verdict (rule `verdict`) and a passage's own figures (rule
    `figures_`) may follow a space or mark. The body may end anywhere."""
    seps = [f"ps ws {p}-a", f"ps {p}-m", f"pm {p}-m"]
    slot = [f"{slots} {p}-x"] if slots else []
    free = [f"fw {p}-x", *([f"{verdict} {p}-x"] if verdict else []), *([f"{figures_} {p}-x"] if figures_ else [])]
    return [f"{p}-a ::= " + " | ".join(['""', f"ws {p}-a", *seps, *slot, *free]),
            f"{p}-m ::= " + " | ".join(['""', f"ws {p}-m", *seps, *free]),
            f"{p}-x ::= " + " | ".join(['""', f"ws {p}-m", *seps])]


def _winners(rows: dict[int, dict], group: tuple[int, ...]) -> list[str]:
    """The winner sentences a comparison of `group` may say (claims.winner_sentences)."""
    return winner_sentences({n: rows[n] for n in group})


def gbnf(passages: Sequence[str], expected: Collection[int] | None = None) -> str:
    """A GBNF grammar (llama.cpp's; xgrammar reads it too) of the answers the rows in `passages` ground: see the
    module. `expected`: the rows (1-based) the question resolved to, as `claims.check` and `Rules` take it."""
    ctx = Context(list(passages))
    wanted = None if expected is None else {int(i) for i in expected}
    citable = [n for n in range(1, len(ctx.passages) + 1) if wanted is None or n in wanted or ctx.row(n) is None]
    first = [n for n in citable if not wanted or n in wanted]  # the answer opens with a row asked about
    # a question resolved to rows (`expected`) is answered about them: no answer that cites nothing
    # without `expected`, also a fixed sentence then rows named as what they are ("The College Scorecard has no ...
    # What it lists there instead: [1] <name>."): the reply for a row a school lacks, as the dataset teaches it
    rules = ["root ::= " + ("an" if first and wanted else "fx | an | fx b+" if first else "fx")]
    # fixed: no citation, no figure, no verdict, no winner
    rules += ['fx ::= fv fx-x | fx-s fx-a', 'fx-s ::= ws | ps | pm | "("', 'fx-a ::= "" | fx-s fx-a | fv fx-x',
              'fx-x ::= "" | fx-s fx-a', f"ws ::= {_WS}", f"ps ::= {_STOP}", f"pm ::= {_OTHER}"]
    rules += _word_rules("fv", CLAIM_WORDS, FIXED_CASED)
    if not first:
        return "\n".join(rules) + "\n"
    rows = {n: ctx.row(n) for n in citable if ctx.row(n) is not None}
    opening = {}
    for n in citable:
        row, after = rows.get(n), f"(ws r{n}-a | r{n}-x)"  # after the name: the first clause opens past a space
        if row is None:  # a passage of the user's own: no name; its figures
            figs = sorted({f.text.strip() for f in figures(ctx.passages[n - 1]) if f.counts})
            if figs:
                rules.append(f"g{n} ::= " + " | ".join(lit(f) for f in figs))
            rules += _body(f"r{n}", None, None, f"g{n}" if figs else None)
            rules.append(f'b{n} ::= "[{n}]" {after}')
            opening[n] = f"b{n}"
            continue
        slots = _slots(row, ctx.passages[n - 1])
        rules.append(f"s{n} ::= " + " | ".join(slots.values()))
        names = []
        for k, name in enumerate(cited_names(row["credential"], row["program"], row["school"])):
            if name.endswith("."):
                names.append(f"{lit(name)} {after}")
                continue
            # after "At <school>," or "<credential> in <program>," the clause goes on: a slot there is read with the
            # name's words, so only a field that the check still reads from its label may open it
            safe = [f for f in slots if cue_field(f" {name} {_labels(ctx.passages[n - 1], f)[0]}: ") == f]
            if safe and len(safe) < len(slots):
                rules.append(f"s{n}-{k} ::= " + " | ".join(slots[f] for f in safe))
            slot = f"s{n} r{n}-x | " if len(safe) == len(slots) else f"s{n}-{k} r{n}-x | " if safe else ""
            names.append(f"{lit(name)} (ws ({slot}r{n}-m) | r{n}-x)")
        rules.append(f"n{n} ::= " + " | ".join(names))
        test = _verdict_slot(row)
        if test:
            rules.append(f"t{n} ::= {test}")
        rules += _body(f"r{n}", f"s{n}", f"t{n}" if test else None, None)
        rules.append(f'b{n} ::= "[{n}] " n{n}')
        opening[n] = f'"[{n}] " "{VERDICT_TEXT[ctx.premium_passes(n)]}. "? n{n}'
    rules.append("f ::= " + " | ".join(opening[n] for n in first))
    rules.append("b ::= " + " | ".join(f"b{n}" for n in citable))
    answers = ["f b*"]
    # comparisons: rows with earnings, each cited once, then the winner
    earning = [n for n in rows if rows[n]["values"].get("earnings") is not None]
    for size in (2, 3) if len(earning) <= 3 else (2,):  # three rows' orders only where there are three
        for group in combinations(earning, size):
            said = _winners(rows, group)
            orders = [o for o in permutations(group) if o[0] in first]
            if not said or not orders:
                continue
            name = "w-" + "-".join(map(str, group))
            rules.append(f'{name} ::= ". " ({" | ".join(lit(s) for s in said)})')
            answers += [" ".join([f"({opening[head]})", *(f"b{m}" for m in rest), name, f"r{rest[-1]}-x"])
                        for head, *rest in orders]
    rules.insert(1, "an ::= " + " | ".join(f"({a})" for a in answers))
    rules += _word_rules("fw", NO_DATA_WORDS + CLAIM_WORDS, CASED_WORDS)
    return "\n".join(rules) + "\n"
