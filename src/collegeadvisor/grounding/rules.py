"""What may follow a partial answer, one token at a time (`Rules`): the decode-time side of the claims that
`grounding.claims.check` reads back; generation applies it through generate.GroundedDecoding."""

from __future__ import annotations

import re
from typing import Collection, Sequence

from collegeadvisor.data.scorecard_answers import no_data_note
from collegeadvisor.grounding.claims import (
    CITATION,
    Context,
    TEST_WORDS,
    WINNER_OPEN,
    WINNER_OPENING,
    YES_NO,
    cited_at,
    digits,
    field_at,
    row_names,
    winner_sentences,
)


_OPEN = re.compile(r"(?<![\w.,$])(?:-?\$?-?\d[\d,]*(?:\.\d*)?|-?\$)$")
_NOTE_OPEN = re.compile(r":[ \t]*no data \((?P<rest>[^()\n]*)$")  # inside the reason after a value slot's "no data"
_AT_VERDICT = re.compile(r"\s*\[(\d{1,2})\]\s*")

_FREE = re.compile(r"\d{1,2}")
_LEAD = re.compile(r"[-$0-9.,%]*")
NO_WORDS = {"no", "not", "none", "n", "na", "n/a", "unavailable", "unknown", "suppressed"}


_BRACKET = re.compile(r"\[([^\[\]]*)(\]?)")  # a "[...]" expression: its content, and "]" when closed
VERDICT_WORDS = ("Yes", "No", "Unknown")  # how an answer opens its verdict: "[1] Yes. <name>."


def signature(piece: str) -> tuple:
    """What `Rules.admits` reads of a token's text: two texts with one signature are admitted alike (a text with
    "[" is read whole: the citation it writes)."""
    if "[" in piece:
        return ("bracket", piece)
    word = piece.strip().lower()
    if word in YES_NO or word in NO_WORDS or word in TEST_WORDS:
        return ("word", word, piece[:1] == " ")
    body = piece.lstrip(" ([")
    lead = _LEAD.match(body).group()
    head = _LEAD.match(piece).group()
    return ("figure", body is piece or body == piece, lead, bool(body[len(lead):]), head, bool(piece[len(head):]),
            re.match(r"[0-9]+", piece).group() if piece[:1].isdigit() and re.match(r"[0-9]+", piece) else None,
            piece.strip()[:1])  # how it begins, stripped: a field's value slot keeps " $" and not " ($"


def _variants(value: str) -> set[str]:
    """The ways a row value may be written: "-$1,234" as itself, "$1,234", "1,234", "-1,234"."""
    forms = {value, value.lstrip("-")}
    return forms | {f.replace("$", "") for f in forms}


class Rules:
    """What may follow a partial answer, given the passages: `admits(text, piece)` is False when appending
    `piece` would write a figure that is not the cited row's value for the field being spoken of (or any figure
    before the first citation), a yes/no that the cited row's premium contradicts, "no data" for a field the row
    has, a "[...]" that is not the citation of a retrieved row ("[I]", "[1a]"; with `expected`, a Scorecard row the
    question resolved to), or, right after a citation of a Scorecard row, anything but the row's own name
    (`row_names`, after an opening verdict). `forbid` adds what a failed check found."""

    def __init__(self, passages: Sequence[str], forbid: dict | None = None, expected: Collection[int] | None = None):
        self.ctx = Context(list(passages))
        self.forbid = forbid or {}
        self.expected = None if expected is None else {int(i) for i in expected}
        banned = set(self.forbid.get("rows", ()))
        self.citable = {n for n in range(1, len(self.ctx.passages) + 1) if n not in banned and (
            self.expected is None or n in self.expected or self.ctx.row(n) is None)}
        forbid_key = repr(sorted((k, sorted(map(str, v))) for k, v in self.forbid.items()))
        self._key = (forbid_key, tuple(sorted(self.citable)), tuple(self.ctx.passages))
        self._allowed: dict[str, tuple[set[str], bool]] = {}
        self._names: dict[tuple[int, bool], tuple[str, ...]] = {}
        self._open: tuple[str | None, re.Match | None] = (None, None)
        self._bracket: tuple[str | None, int | None] = (None, None)
        self._slot: tuple[str | None, list[str] | None] = (None, None)

    def allowed(self, before: str) -> set[str]:
        """Figure texts admitted at the end of `before`."""
        return self._at(before)[0]

    def _at(self, before: str) -> tuple[set[str], bool]:
        """(figure texts admitted at the end of `before`, whether it is a value slot of a cited row's field), cached:
        every candidate token asks."""
        got = self._allowed.get(before)
        if got is None:
            n, name = cited_at(before, len(before)), field_at(before)
            values = self.ctx.values(n, name) or []
            banned = set(self.forbid.get("figures", ()))
            texts = {v for value in values for v in _variants(value) if digits(v) not in banned}
            slot = before.rstrip().endswith(":") and name is not None and self.ctx.row(n) is not None
            if len(self._allowed) > 256:
                self._allowed.clear()
            got = self._allowed[before] = (texts, slot)
        return got

    def value_slot(self, text: str) -> bool:
        """Whether text ends in a field's label of a cited Scorecard row ("Completers:", "Median debt: "), where only
        the row's value, or "no data" where it has none, may be written (not a number in words)."""
        return text.rstrip().endswith(":") and self._at(text)[1]

    def open_figure(self, text: str) -> re.Match | None:
        """The figure being written at the end of text, if any (cached: every candidate token asks about it)."""
        if self._open[0] != text:
            self._open = (text, _OPEN.search(text))
        return self._open[1]

    def open_citation(self, text: str) -> int | None:
        """Where the "[" that text ends inside (not closed yet) starts, or None (cached like `open_figure`)."""
        if self._bracket[0] != text:
            at = text.rfind("[")
            self._bracket = (text, at if at >= 0 and "]" not in text[at:] else None)
        return self._bracket[1]

    def _name_texts(self, n: int, opening: bool) -> tuple[str, ...]:
        """What may follow the citation [n] up to the end of its row's name: " <name>" for each of `row_names`, and,
        where the citation opens the answer, " <verdict>. <name>" for a verdict the row's premium supports."""
        key = (n, opening)
        if key not in self._names:
            names = [" " + name for name in row_names(self.ctx.row(n))]
            passes, banned = self.ctx.premium_passes(n), self.forbid.get("verdicts", ())
            words = [w for w in VERDICT_WORDS if opening and YES_NO[w.lower()] == passes and passes not in banned]
            self._names[key] = tuple(names + [f" {w}.{name}" for w in words for name in names])
        return self._names[key]

    def _after_citation(self, text: str) -> tuple[tuple[str, ...], str] | None:
        """(the texts that may follow the last citation in text, what follows it so far) where that citation is of
        a Scorecard row; else None."""
        at = text.rfind("[")
        m = CITATION.match(text, at) if at >= 0 else None
        if m is None or self.ctx.row(int(m.group(1))) is None:
            return None
        return self._name_texts(int(m.group(1)), not text[:at].strip()), text[m.end():]

    def _compared(self, text: str) -> dict[int, dict] | None:
        """The rows text cites, where they are two or more and all have earnings (a comparison); else None."""
        cited = {int(c.group(1)) for c in CITATION.finditer(text)}
        rows = {n: r for n, r in ((n, self.ctx.row(n)) for n in sorted(cited)) if r is not None}
        if len(rows) < 2 or any(r["values"].get("earnings") is None for r in rows.values()):
            return None
        return rows

    def _winner_texts(self, text: str) -> tuple[tuple[str, ...], str] | None:
        """(the winner sentences' rests, what is written of one) where text ends inside one ("Graduates of ", "The ")
        after two or more cited rows that all have earnings: those that name a row that earns most, and no other
        (claims.winner_sentences)."""
        m = WINNER_OPEN.search(text)
        rows = self._compared(text[:m.start()]) if m is not None else None
        if rows is None:
            return None
        opening = m.group("opening")
        said = tuple(s[len(opening):] for s in winner_sentences(rows) if s.startswith(opening))
        return (said, m.group("rest")) if said else None

    def _note_texts(self, text: str) -> tuple[tuple[str, ...], str] | None:
        """(the reason that may follow "no data (" in a cited Scorecard row's value slot, closed: `no_data_note`; what
        is written of it) where text ends inside one; else None."""
        m = _NOTE_OPEN.search(text)
        if m is None:
            return None
        before = text[:m.start() + 1]
        name, row = field_at(before), self.ctx.row(cited_at(before, len(before)))
        note = no_data_note(name, row["values"]) if name is not None and row is not None else None
        return ((note + ")",), m.group("rest")) if note else None

    def refused_openings(self, text: str) -> tuple[str, ...]:
        """Where a comparison's winner sentence may open next (text ends a sentence, after two or more cited rows
        with earnings): the openings that would name no winner alone ("The Bachelor's Degree in X pays more" when
        both schools teach X), so decoding refuses them and the model opens with one that does."""
        if not text.rstrip().endswith((".", "!", "?")):
            return ()
        rows = self._compared(text)
        if rows is None:
            return ()
        said = winner_sentences(rows)
        return tuple(o for o in WINNER_OPENING.values() if not any(s.startswith(o + " ") for s in said))

    @staticmethod
    def _rests(found: tuple[tuple[str, ...], str] | None) -> list[str] | None:
        if found is None or any(found[1].startswith(f) for f in found[0]):
            return None
        return [f[len(found[1]):] for f in found[0] if f.startswith(found[1])] or None

    def name_slot(self, text: str) -> list[str] | None:
        """Where text ends in the name after a citation of a Scorecard row (the citation, perhaps its opening verdict,
        part of a name), in a comparison's winner, or in the reason after a value slot's "no data (": the rests of
        the texts that may complete it; None elsewhere and once it is complete."""
        if self._slot[0] != text:
            rests = self._rests(self._after_citation(text))
            if rests is None:
                rests = self._rests(self._winner_texts(text))
            self._slot = (text, rests if rests is not None else self._rests(self._note_texts(text)))
        return self._slot[1]

    def unfinished(self, text: str) -> int | None:
        """Where a citation that text ends inside starts (an open "[", or a citation whose name isn't complete)."""
        at = self.open_citation(text)
        return text.rfind("[") if at is None and self._rests(self._after_citation(text)) is not None else at

    def _free(self, figure: str, before: str) -> bool:
        """A 1-2 digit number is no figure ("[1]", "4 years"), except in a field's value slot ("Median debt: ")."""
        return bool(_FREE.fullmatch(figure)) and not self._at(before)[1]

    def complete(self, figure: str, before: str) -> bool:
        figure = figure.rstrip(".,")
        return self._free(figure, before) or figure in self.allowed(before)

    def _prefix(self, figure: str, before: str) -> bool:
        if self._free(figure, before) or any(a.startswith(figure) for a in self.allowed(before)):
            return True
        return figure[-1:] in (".", ",") and self.complete(figure[:-1], before)

    def _brackets(self, text: str, piece: str) -> bool:
        """Every "[...]" that piece writes into (closed or still open) holds a citable row's index: 1-2 digits, or
        the first digit of one while open ("[I]", "[a]", "[1a]", "[]", "[123]" are refused)."""
        start = self.open_citation(text)
        if start is None:
            if "[" not in piece:
                return True
            start = len(text)
        new = text + piece
        for m in _BRACKET.finditer(new, start):
            content, number = m.group(1), _FREE.fullmatch(m.group(1)) is not None
            if m.group(2):
                ok = number and int(content) in self.citable
            elif m.end() == len(new):
                ok = not content or (number and any(str(n).startswith(content) for n in self.citable))
            else:
                ok = False  # a "[" left open by another "["
            if not ok:
                return False
        return True

    def _named(self, text: str, piece: str) -> bool:
        """After a citation of a Scorecard row, only that row's name (after the opening verdict) may be written."""
        rests = self.name_slot(text)
        if rests is not None:
            return any(r.startswith(piece) or piece.startswith(r) for r in rests)
        if "]" not in piece:
            return True
        found = self._after_citation(text + piece)
        if found is None or len(found[1]) >= len(piece):  # no citation closed by this piece
            return True
        return any(f.startswith(found[1]) or found[1].startswith(f) for f in found[0])

    def _words(self, text: str, piece: str) -> bool:
        """A leading yes/no, the test's verdict and "no data" in a value slot."""
        word = piece.strip().lower()
        at = _AT_VERDICT.fullmatch(text) if word in YES_NO else None
        if at:
            passes = self.ctx.premium_passes(int(at.group(1)))
            if passes != YES_NO[word] or YES_NO[word] in self.forbid.get("verdicts", ()):
                return False
        if word in TEST_WORDS and cited_at(text, len(text)) is not None:
            passes = self.ctx.premium_passes(cited_at(text, len(text)))
            if passes is None or passes != TEST_WORDS[word] or TEST_WORDS[word] in self.forbid.get("verdicts", ()):
                return False
        if word in NO_WORDS and text.rstrip().endswith(":"):
            name, row = field_at(text), self.ctx.row(cited_at(text, len(text)))
            if name and ((row and row["values"].get(name) is not None) or name in self.forbid.get("no_data", ())):
                return False
        return True

    def decision_key(self, text: str):
        """What `admits(text, piece)` depends on for any piece, hashable; None where it depends on more (inside a
        "[", in the name after a citation, at the verdict, in a value slot). Decoding caches its token masks under
        it (across the rows of a batch: the key holds what sets one row's rules apart)."""
        if self.open_citation(text) is not None or self.name_slot(text) is not None or text.rstrip().endswith(":") \
                or _AT_VERDICT.fullmatch(text):
            return None
        open_ = self.open_figure(text)
        verdict = self.ctx.premium_passes(cited_at(text, len(text)))  # what "passes"/"fails" may say here
        if open_ is not None:
            return ("open", open_.group(), frozenset(self.allowed(text[:open_.start()])), verdict, self._key)
        wordy = bool(text[-1:]) and (text[-1].isalnum() or text[-1] in "_.,$")
        return ("free", wordy, frozenset(self.allowed(text)), verdict, self.refused_openings(text), self._key)

    def admits(self, text: str, piece: str) -> bool:
        """Whether `piece` may follow `text` (see the class)."""
        if not (self._words(text, piece) and self._brackets(text, piece) and self._named(text, piece)):
            return False
        open_ = self.open_figure(text)
        if open_ is None:
            body = piece.lstrip(" ([")
            lead = _LEAD.match(body).group()
            if not any(c.isdigit() or c == "$" for c in lead):
                return True
            if body is piece and text[-1:] and (text[-1].isalnum() or text[-1] in "_.,$"):
                return True  # digits inside a word or after a figure's own characters: not a new figure
            before, figure, rest = text, lead, body[len(lead):]  # what precedes it (" ", "(") names no field
        else:
            lead = _LEAD.match(piece).group()
            before, figure, rest = text[:open_.start()], open_.group() + lead, piece[len(lead):]
            if not lead:
                return self.complete(open_.group(), before)
        return self.complete(figure, before) if rest else self._prefix(figure, before)
