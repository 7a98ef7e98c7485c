"""What a conversation asks about, resolved against the Scorecard's own names: the school (or two), the program, the
credential, the state and the field asked for, plus what the data can't answer (a topic it doesn't cover, a school
it doesn't hold, a name several schools share).

A question is read the way people write one: lowercase, typos, abbreviations and nicknames. Its words are
1. corrected where they are no word of a school or program name (rapidfuzz over those names' words);
2. matched, longest phrase first, against the schools' names and variants (`kb.parse`'s indexes), initialisms
   generated from the names ("fsu", "njit", "ucla"; "umn" for University of Minnesota), and the alias table kept
   as data (`aliases.json`: "ou norman", "pitt", "slp", "poli sci"), and against program names and their aliases;
3. read by `kb.parse` for credential and state words, and for rare words that point to a program.
`resolve_conversation` folds the user's turns: a follow-up keeps what the conversation fixed and changes only
what it names ("and at ucsd?" the school, "what about debt?" the field, "and the master's?" the credential).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

from collegeadvisor.data.fields import UNCOVERED, question_cues
from collegeadvisor.data.scorecard import load_table
from collegeadvisor.kb.nameindex import aliases, name_indexes, zipf_of
from collegeadvisor.kb.parse import (
    NOT_PROGRAM_WORDS,
    RARE_WORD,
    STATES,
    _phrase_index,
    names,
    normalize,
    parse,
    unused_spans,
)

STATE_NAMES = {" ".join(normalize(name)) for name in STATES.values()}
LONGEST = 14  # words in the longest school or program phrase matched
ENGLISH = 3.0  # wordfreq zipf at or above which a word is left as written (no typo correction)
TYPO_SCORE = 84  # rapidfuzz ratio a correction needs
# Words of a question that point to no program, though some program's name has them ("student loans").
QUESTION_WORDS = {"student", "students", "loan", "loans", "debt", "pay", "paid", "salary", "grads", "graduates",
                  "earn", "earnings", "money", "job", "jobs", "career", "work", "working", "degree", "program",
                  "major", "school", "college", "university", "campus", "after", "worth", "median", "typical",
                  "income", "people", "ppl", "make", "instead", "more", "less", "high", "diploma", "just", "only",
                  "good", "better", "best", "main", "general", "other", "related", "services", "studies",
                  "graduate", "graduating", "grad", "study", "studying", "majoring", "data", "scorecard", "says",
                  "pretend", "project", "counselor", "advisor", "instructions", "previous", "confirm", "tell"}
# Words of the Scorecard's credential names ("Undergraduate Certificate or Diploma"): they name no program.
CREDENTIAL_TERMS = {"undergraduate", "certificate", "diploma", "associates", "associate", "degree", "bachelors",
                    "bachelor", "masters", "master", "doctoral", "doctorate", "graduate", "professional", "first",
                    "post", "baccalaureate", "non", "credential", "preparatory", "coursework", "teacher",
                    "certification", "certificates"}
COMPARE_PROGRAMS = re.compile(r"\b(?:or|vs|versus|compare|compared)\b")
SCHOOL_WORDS = r"university|college|institute|academy|polytechnic|conservatory|seminary"
COMPARE_CUE = re.compile(r"\b(?:or|vs|versus|compare|compared|comparison|which|better|between)\b")

# The field a question asks for, most specific first (`data.fields.KINDS`); a topic the Scorecard doesn't hold
# (asked without any of these fields) gets a sentence on what the data covers.
FIELD_CUES = question_cues()
OFF_TOPIC = [(topic.name, topic.cue) for topic in UNCOVERED]
_OFF_RE = [(name, re.compile(p, re.I)) for name, p in OFF_TOPIC]
_UNKNOWN_SCHOOL = re.compile(
    rf"\b((?:the\s+)?(?:[a-z][a-z&'.-]*\s+){{0,3}}(?:{SCHOOL_WORDS})(?:\s+of(?:\s+[a-z][a-z&'.-]*){{1,3}})?)\b")
PHRASE_STOP = {"at", "from", "of", "in", "for", "to", "the", "a", "an", "and", "or", "grads", "graduates",
               "students", "alumni", "attend", "attending", "go", "going", "about", "my", "with", "salary", "pay",
               "earnings", "degree", "major", "program"}
_AT_WORD = re.compile(r"\b(?:at|from|attend|attending|to)\s+([a-z][a-z&'.-]{2,}(?:\s+[a-z][a-z&'.-]{2,}){0,2})")


@dataclass
class School:
    text: str  # as the question wrote it
    names: tuple[str, ...]  # the school names it can mean
    units: tuple[tuple[str, str, str], ...] = ()  # (unitid, name, state) it can mean: one resolved, several ambiguous
    start: int = -1  # its first word's place in the message


@dataclass
class Resolution:
    """What the conversation asks about so far; `off_topic` and `unknown_school` are the last turn's."""
    schools: list[School] = field(default_factory=list)  # two for a comparison of schools
    programs: list[tuple[str, ...]] = field(default_factory=list)  # per program named: candidates, best first
    program_levels: list[tuple[str, ...]] = field(default_factory=list)  # per program: the credential said with it
    program_text: str = ""
    levels: tuple[str, ...] = ()  # Scorecard credential_level codes
    state: str | None = None
    field: str | None = None  # earnings | debt | ratio | premium
    off_topic: str | None = None
    unknown_school: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def _units() -> dict[str, tuple[tuple[str, str, str], ...]]:
    """school name -> its (unitid, name, state): a name may belong to several schools ("Columbia College")."""
    pairs = load_table()[["inst_name", "unitid", "state"]].drop_duplicates()
    out: dict[str, list] = {}
    for name, unitid, state in pairs.itertuples(index=False):
        out.setdefault(str(name), []).append((str(unitid), str(name), str(state)))
    return {k: tuple(sorted(v)) for k, v in out.items()}


def with_units(school: School, state: str | None = None) -> School:
    """The school with the schools its names mean, narrowed to `state` where that leaves any."""
    units = tuple(u for name in school.names for u in _units().get(name, ()))
    narrowed = tuple(u for u in units if u[2] == state) if state else ()
    return replace(school, units=narrowed or units)


def _clean(text: str) -> str:
    """The text with the dots of initialisms ("U.C.L.A.") undone (a possessive is read in `_variants`)."""
    text = re.sub(r"\b((?:[A-Za-z]\.){2,})", lambda m: m.group(1).replace(".", ""), text)
    return text


@lru_cache(maxsize=4096)
def _corrected(word: str) -> str:
    """A typo fixed: the closest word of a school or program name, where the word is no ordinary word."""
    from rapidfuzz import fuzz, process  # delayed: only a word no name holds needs it

    schools, programs, words = name_indexes()
    if (len(word) < 5 or not word.isalpha() or word in words or word in schools or word in programs
            or zipf_of()(word) >= ENGLISH):
        return word
    found = process.extractOne(word, sorted(words), scorer=fuzz.ratio, score_cutoff=TYPO_SCORE)
    return found[0] if found else word


def _variants(key: str) -> list[str]:
    """A phrase as written, then with its short words spelled out ("portland st" -> "portland state")."""
    spelled = " ".join(aliases()["words"].get(w, w) for w in key.split())
    out = [key] if spelled == key else [key, spelled]
    if key.endswith("s") and len(key.split()[-1]) > 2:  # "uga's" reads as "ugas": the name is "uga"
        out += [v[:-1] for v in out]
    return out


def _spans(tokens: list[str]) -> tuple[list[School], list[tuple[str, ...]], list[str], list[bool]]:
    """The schools and programs a token list names, longest phrase first, and the tokens they use."""
    schools, programs, _ = name_indexes()
    used = [False] * len(tokens)
    found: list[tuple[int, str, object, str]] = []
    for i, n, key in unused_spans(tokens, LONGEST, used):
        for variant in _variants(key):
            if variant in schools:
                found.append((i, "school", schools[variant], key))
            elif variant in programs:
                found.append((i, "program", programs[variant], key))
            else:
                continue
            used[i:i + n] = [True] * n
            break
    found.sort(key=lambda f: f[0])
    found = _campus_words_dropped(tokens, found)
    school_list = [School(text, values, start=i) for i, kind, values, text in found if kind == "school"]
    program_list = [values for _, kind, values, _ in found if kind == "program"]
    program_text = [text for _, kind, _, text in found if kind == "program"]
    levels = [_level_before(tokens, i) for i, kind, _, _ in found if kind == "program"]
    return school_list, list(zip(program_list, levels)), program_text, used


def _campus_words_dropped(tokens: list[str], found: list[tuple]) -> list[tuple]:
    """A school named right after another, with no "or"/"vs" between, is the first one's campus or city
    ("purdue west lafayette"), not a second school."""
    out: list[tuple] = []
    for item in found:
        before = next((f for f in reversed(out) if f[1] == "school"), None)
        if item[1] == "school" and before is not None:
            gap = tokens[before[0] + len(before[3].split()):item[0]]
            if len(gap) <= 1 and not COMPARE_PROGRAMS.search(" ".join(gap) or "-") and "and" not in gap:
                continue
        out.append(item)
    return out


def _level_before(tokens: list[str], start: int) -> tuple[str, ...]:
    """The credential named just before a program ("the master's in X"): its levels, or ()."""
    phrases = _phrase_index()
    credentials = aliases()["credentials"]
    end = start
    while end > 0 and tokens[end - 1] in ("in", "of", "the", "a", "an", "degree", "program", "s"):
        end -= 1
    for n in (3, 2, 1):
        if end - n < 0:
            continue
        key = " ".join(credentials.get(t, t) for t in tokens[end - n:end])
        kind, levels = phrases.get(key, ("", ()))
        if kind == "credential_level":
            return tuple(levels)
    return ()


def _credential_words(tokens: list[str]) -> list[str]:
    """Credential words people use that `kb.parse` spells out ("cert", "undergrad"); "diploma" after "high
    school" or "hs" is the yardstick of the earnings premium, not a credential."""
    table = aliases()["credentials"]
    out = []
    for i, t in enumerate(tokens):
        if t == "diploma" and i and tokens[i - 1] in ("hs", "school", "ged"):
            continue
        out.append(table.get(t, t))
    return out


def _words_programs(words: list[str]) -> tuple[str, ...]:
    """Programs named by rare words only ("criminal justice", "nutrition"): those sharing the most weight of the
    question's words and of whose name those words cover most ("Nutrition Sciences", not "Dietetics and Clinical
    Nutrition Services": a school without the first is said to lack it, and its nearest programs are named)."""
    idx = names()
    content = {w for w in words if w in idx.word_programs and w not in QUESTION_WORDS and w not in NOT_PROGRAM_WORDS}
    candidates = {p for w in content if len(idx.word_programs[w]) <= RARE_WORD for p in idx.word_programs[w]}

    def score(program: str) -> tuple[float, float]:
        own = idx.program_words[program] - NOT_PROGRAM_WORDS
        matched = sum(idx.idf[w] for w in content & own)
        return matched, matched / max(sum(idx.idf.get(w, 0.0) for w in own), 1e-9)

    ranked = sorted(candidates, key=lambda p: (-score(p)[0], -score(p)[1], p))
    return tuple(p for p in ranked if all(abs(a - b) < 1e-9 for a, b in zip(score(p), score(ranked[0]))))


def _field(text: str) -> str | None:
    """The field asked for: the most specific cue; debt and earnings asked together are the debt-to-earnings ratio
    ("how does debt compare to earnings", "the loan compared to income")."""
    found = {name for name, pattern in FIELD_CUES if pattern.search(text)}
    if {"debt", "earnings"} <= found and not found & {"premium", "ratio"}:
        return "ratio"
    return next((name for name, _ in FIELD_CUES if name in found), None)


def _off_topic(text: str, asked: str | None) -> str | None:
    if asked is not None:
        return None
    return next((name for name, pattern in _OFF_RE if pattern.search(text)), None)


def _unknown_school(text: str, tokens_left: list[str]) -> str | None:
    """A phrase that names a school the data doesn't hold ("Hogwarts University", "at hogwarts")."""
    lowered = " ".join(tokens_left)
    m = _UNKNOWN_SCHOOL.search(lowered)
    if m:
        words = m.group(1).split()
        at = max((i for i, w in enumerate(words) if re.fullmatch(SCHOOL_WORDS, w)), default=0)
        start = max((i + 1 for i, w in enumerate(words[:at]) if w in PHRASE_STOP), default=0)
        phrase = " ".join(words[start:])
        if not re.fullmatch(rf"(?:{SCHOOL_WORDS})(?: of)?", phrase) and phrase not in ("high school",):
            return phrase
    _, _, words = name_indexes()
    for m in _AT_WORD.finditer(text.lower()):
        first = m.group(1).split()[0]
        if first not in words and zipf_of()(first) < ENGLISH and first.isalpha():
            return m.group(1).split(" for ")[0].strip()
    return None


def _flagships(tokens: list[str], used: list[bool]) -> list[School]:
    """A state's name then a word no name holds, the city ("alabama tuscaloosa"): the state's university, where the
    Scorecard has one named "University of <State>"."""
    schools, _, words = name_indexes()
    found = []
    for i in range(len(tokens) - 1):
        for n in (2, 1):
            state, city = " ".join(tokens[i:i + n]), tokens[i + n] if i + n < len(tokens) else ""
            if (any(used[i:i + n + 1]) or state not in STATE_NAMES or not city.isalpha() or city in words
                    or zipf_of()(city) >= ENGLISH):
                continue
            names = schools.get(f"university of {state}")
            if names and len(names) == 1:
                found.append(School(f"{state} {city}", names, start=i))
                used[i:i + n + 1] = [True] * (n + 1)
    return found


def _longer_unknown(tokens: list[str], schools: list[School]) -> str | None:
    """A known name inside an unknown one ("wakanda institute of technology" holds "Institute of Technology"):
    the word before the name is no word of any name and no ordinary word."""
    _, _, words = name_indexes()
    for s in schools:
        before = tokens[s.start - 1] if s.start > 0 else ""
        if (before.isalpha() and before not in words and before not in PHRASE_STOP
                and zipf_of()(before) < ENGLISH and re.match(SCHOOL_WORDS, s.text)):
            return f"{before} {s.text}"
    return None


def resolve_turn(text: str) -> Resolution:
    """What one message names (see the module)."""
    cleaned = _clean(text or "")
    tokens = [_corrected(t) for t in normalize(cleaned)]
    found_schools, found_programs, program_text, used = _spans(tokens)
    left = [t for t, u in zip(tokens, used) if not u]
    parsed = parse(" ".join(_credential_words(left)))
    programs = [(p, lv) for p, lv in found_programs if p]
    programs += [(tuple(sorted(p)), tuple(sorted(lv or ()))) for p, lv in parsed.pairs if p]
    by_words = _words_programs([t for t in left if t not in CREDENTIAL_TERMS])
    either = COMPARE_PROGRAMS.search(" ".join(left).replace("certificate or diploma", "certificate"))
    if by_words and (not programs or (len(programs) == 1 and either)):
        programs.append((by_words, ()))  # named in other words, or the other side of "X or Y"
    state = next(iter(sorted(parsed.fields["state"])), None)
    found_schools += _flagships(tokens, used)
    schools: list[School] = []
    for s in sorted(found_schools, key=lambda s: s.start):
        if all(set(s.names) != set(o.names) for o in schools):
            schools.append(with_units(s, state))
    unknown = _unknown_school(cleaned, left) if not schools else _longer_unknown(tokens, schools)
    if unknown:
        schools = []
    asked = _field(cleaned)
    rest = " ".join(left)  # what no school or program name took: "Sports, Kinesiology..." is no question on sports
    return Resolution(
        schools=schools, programs=[p for p, _ in programs], program_levels=[lv for _, lv in programs],
        program_text=" / ".join(program_text),
        levels=tuple(sorted(parsed.fields["credential_level"], key=lambda lv: -parsed.levels.get(lv, 0.0))),
        state=state, field=asked, off_topic=_off_topic(rest, asked),
        unknown_school=unknown)


def resolve_conversation(messages: list[dict]) -> Resolution:
    """The user's turns folded: each keeps what earlier turns fixed and changes only what it names."""
    state = Resolution()
    for message in messages:
        if message.get("role") != "user":
            continue
        turn = resolve_turn(str(message.get("content") or ""))
        state = replace(
            state,
            schools=turn.schools or state.schools,
            programs=turn.programs or state.programs,
            program_levels=turn.program_levels if turn.programs else state.program_levels,
            program_text=turn.program_text if turn.programs else state.program_text,
            levels=turn.levels or state.levels,
            state=turn.state or (state.state if not turn.schools else None),
            field=turn.field or state.field,
            off_topic=turn.off_topic, unknown_school=turn.unknown_school)
        if turn.unknown_school:  # a school the data doesn't hold replaces the one before
            state.schools = []
        elif turn.state and not turn.schools:  # "the one in Missouri" narrows the school named before
            state.schools = [with_units(s, turn.state) for s in state.schools]
    return state


def compare_cue(text: str) -> bool:
    """Whether a message asks to compare ("X or Y", "vs", "which pays more")."""
    return bool(COMPARE_CUE.search((text or "").lower()))
