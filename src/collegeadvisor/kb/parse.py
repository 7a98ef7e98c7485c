"""What a question names: its schools, programs, credentials and state, read against the Scorecard's own names.

The question's words are matched, longest phrase first, against name indexes built from the table, in passes
(`Names.passes`): school names and their usual variants ("The" left out, "University of X" as "X University", a
campus after a dash, in parentheses or after "at", the main campus for a school named without one, "University"
or "College" left out: "Ohio State"); then, in one pass, program names and their short forms (the part before
the first comma), credential and state words; last, one-word school names ("Princeton"). A credential word is paired with the program it qualifies ("a master's in
X or a bachelor's in Y"). `Parse` keeps how exactly each school and credential was named, so retrieval can rank
the rows a question means most exactly above those it may mean.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

from collegeadvisor.data.scorecard import load_table

# Spelling variants folded together before names and questions are compared.
TOKEN_EQUIV = {"saint": "st", "mount": "mt", "fort": "ft", "&": "and"}

# Credential words (normalized) -> Scorecard credential_level codes; the longest phrase wins. A word for a family
# of levels lists its plain meaning first ("certificate": an undergraduate certificate).
CREDENTIAL_WORDS = {
    ("1",): ["undergraduate certificate", "undergraduate diploma", "diploma"],
    ("2",): ["associate", "associates", "associate degree", "aas", "two year degree", "associate of arts",
          "associate of science", "associate of applied science"],
    ("3",): ["bachelor", "bachelors", "baccalaureate", "ba", "bs", "bsn", "bsw", "bfa", "bba", "bsba", "four year degree",
          "undergraduate degree", "bachelor of science", "bachelor of arts"],
    ("4",): ["post baccalaureate certificate", "postbaccalaureate certificate", "post baccalaureate", "post bacc",
          "post bacc certificate"],
    ("5",): ["master", "masters", "ma", "ms", "msn", "msw", "mba", "mfa", "mph", "master of science",
          "master of arts", "master of business administration"],
    ("6",): ["doctoral", "doctorate", "phd", "ph d", "doctor of philosophy", "edd"],
    ("7",): ["first professional", "professional degree", "jd", "md", "dds", "dmd", "pharmd", "dvm", "law degree",
          "medical degree", "juris doctor", "doctor of medicine"],
    ("8",): ["graduate certificate", "professional certificate", "graduate professional certificate"],
    ("99",): ["non credential", "noncredential", "preparatory coursework", "teacher certification"],
    ("1", "4", "8"): ["certificate", "certificates"],
    ("5", "6"): ["graduate degree"],
}
# Degree words that name the field too: they stand for that program when no program name follows them.
DEGREE_FIELDS = {
    "bsn": "registered nursing", "msn": "registered nursing", "mba": "business administration",
    "bsw": "social work", "bba": "business administration", "bsba": "business administration",
    "master of business administration": "business administration", "msw": "social work", "mph": "public health",
    "jd": "law", "juris doctor": "law", "law degree": "law", "md": "medicine", "doctor of medicine": "medicine",
    "medical degree": "medicine", "pharmd": "pharmacy", "dds": "dentistry", "dmd": "dentistry",
    "dvm": "veterinary medicine",
}

STATES = {
    "AL": "Alabama", "AK": "Alaska", "AZ": "Arizona", "AR": "Arkansas", "CA": "California", "CO": "Colorado",
    "CT": "Connecticut", "DE": "Delaware", "DC": "District of Columbia", "FL": "Florida", "GA": "Georgia",
    "HI": "Hawaii", "ID": "Idaho", "IL": "Illinois", "IN": "Indiana", "IA": "Iowa", "KS": "Kansas",
    "KY": "Kentucky", "LA": "Louisiana", "ME": "Maine", "MD": "Maryland", "MA": "Massachusetts",
    "MI": "Michigan", "MN": "Minnesota", "MS": "Mississippi", "MO": "Missouri", "MT": "Montana",
    "NE": "Nebraska", "NV": "Nevada", "NH": "New Hampshire", "NJ": "New Jersey", "NM": "New Mexico",
    "NY": "New York", "NC": "North Carolina", "ND": "North Dakota", "OH": "Ohio", "OK": "Oklahoma",
    "OR": "Oregon", "PA": "Pennsylvania", "RI": "Rhode Island", "SC": "South Carolina", "SD": "South Dakota",
    "TN": "Tennessee", "TX": "Texas", "UT": "Utah", "VT": "Vermont", "VA": "Virginia", "WA": "Washington",
    "WV": "West Virginia", "WI": "Wisconsin", "WY": "Wyoming", "PR": "Puerto Rico", "GU": "Guam",
    "VI": "Virgin Islands", "AS": "American Samoa", "MP": "Northern Mariana Islands", "FM": "Micronesia",
    "PW": "Palau", "MH": "Marshall Islands",
}
STATE_CODE = re.compile(r"(?:,\s*|\(|\bin\s+)([A-Z]{2})\b")  # "Columbia College, MO" / "(MO)" / "in MO"

# "School-Campus" names: a question naming only the school means its main campus: the one named so, else the
# campus with the most rows.
MAIN_CAMPUS = {"main campus", "main"}
SCHOOL_WORDS = {"university", "college", "institute", "school", "academy", "seminary", "conservatory"}
DROPPABLE_PREFIXES = ("the ",)  # leading words of a name a question may leave out
SWAPPABLE = ("university", "college")  # "University of X" <-> "X University"; also the words a question may drop
AT_SCHOOL = {"at", "from", "of"}  # a state's name after these may name a school ("graduates of West Virginia")
PAIR_GAP = 3  # words between a credential word and the program it qualifies ("master's degree in X")
RARE_WORD = 25  # a word in at most this many program names points to those programs when no program is named
# Words that never point to a program: function words, and "high school" (the earnings premium's yardstick).
NOT_PROGRAM_WORDS = {"a", "an", "the", "of", "or", "and", "in", "for", "at", "to", "with", "from", "on", "by", "as",
                     "is", "it", "its", "vs", "versus", "than", "do", "does", "high", "school"}

# How exactly a question names a school: its name as written, its name up to spelling, the main campus of the
# school it names, any other variant, another campus of the school it names without campus.
AS_WRITTEN, SAME_NAME, MAIN, VARIANT, OTHER_CAMPUS = 3.0, 2.0, 1.5, 1.0, 0.5
# How exactly it names a credential: a word for that level, the plain meaning of a family word, another member.
EXACT_LEVEL, FAMILY_FIRST, FAMILY_OTHER = 2.0, 1.5, 1.0


def normalize(text: str) -> list[str]:
    """Lowercase word tokens with punctuation dropped and spelling variants folded."""
    return [TOKEN_EQUIV.get(t, t) for t in _raw(text)]


def _raw(text: str) -> list[str]:
    text = text.lower().replace("&", " & ").replace("'", "").replace("\u2019", "")
    return re.findall(r"[a-z0-9]+|&", text)


def _capitalized(text: str) -> list[bool]:
    """Per token of `normalize(text)`: whether it starts with a capital letter as written."""
    text = text.replace("&", " & ").replace("'", "").replace("\u2019", "")
    return [t[0].isupper() for t in re.findall(r"[A-Za-z0-9]+|&", text)]


def _campus(name: str) -> tuple[str, str]:
    """("school", "campus") for "School-Campus" names whose school part names a school, else (name, "")."""
    base, _, campus = name.rpartition("-")
    base_tokens = normalize(base)
    if not base or not SCHOOL_WORDS & set(base_tokens):
        return " ".join(normalize(name)), ""
    return " ".join(base_tokens), " ".join(normalize(campus))


def _aliases(name: str) -> set[str]:
    """Normalized forms a question may write a school's name in."""
    base, campus = _campus(name)
    forms = {" ".join(normalize(name)), base}
    if campus:
        short = campus.removesuffix(" campus")
        forms |= {f"{base} at {campus}", f"{base} {short}", f"{base} at {short}"}
    forms |= {f.replace(" at ", " ") for f in forms if " at " in f}
    for form in list(forms):
        for prefix in DROPPABLE_PREFIXES:
            if form.startswith(prefix):
                forms.add(form[len(prefix):])
    for form in list(forms):
        for word in SWAPPABLE:
            if form.startswith(f"{word} of ") and " " not in form[len(word) + 4:]:
                forms.add(f"{form[len(word) + 4:]} {word}")
            elif form.endswith(f" {word}") and len(form.split()) == 2:
                forms.add(f"{word} of {form.split()[0]}")
    return {f for f in forms if f}


def _shortened(form: str) -> list[str]:
    """A school name form with one "University"/"College" left out ("ohio state", "north texas", "great falls
    college montana state")."""
    words, out = form.split(), []
    for i, word in enumerate(words):
        if word in SWAPPABLE:
            rest = words[2:] if i == 0 and words[1:2] == ["of"] else words[:i] + words[i + 1:]
            out += [" ".join(rest)] if rest else []
    return out


def _preferred(names: set[str], sizes: dict[str, int]) -> set[str]:
    """The main campus among campuses of one school: the one named "Main Campus", else the one with most rows."""
    main = {n for n in names if _campus(n)[1] in MAIN_CAMPUS}
    if main or len(names) < 2 or len({_campus(n)[0] for n in names}) > 1:
        return main
    return {max(sorted(names), key=lambda n: sizes.get(n, 0))}


def _school_indexes(names, sizes: dict[str, int], taken: set[str], common: set[str]) -> tuple[dict, dict, dict]:
    """(names and variants, names with "University"/"College" left out) -> ("school", names), and key ->
    preferred names. Exact names beat variants; an explicit main campus stands for its school; a shortened form
    that is a program, credential or state word (`taken`) is kept apart, under its key prefixed "?"; one made of
    `common` words only ("business and technology", "american") is dropped: it reads as something else."""
    canonical: dict[str, set[str]] = {}
    for name in names:
        canonical.setdefault(" ".join(normalize(name)), set()).add(name)
    index: dict[str, set[str]] = {key: set(found) for key, found in canonical.items()}
    weak: dict[str, set[str]] = {}
    for name in names:
        for alias in _aliases(name):
            if alias not in canonical:
                index.setdefault(alias, set()).add(name)
            for short in _shortened(alias):
                if not set(short.split()) <= common:
                    weak.setdefault(f"?{short}" if short in taken else short, set()).add(name)
    preferred = {}
    for table in (index, weak):
        for key, found in table.items():
            main = _preferred(found, sizes)
            if main and any(_campus(n)[1] in MAIN_CAMPUS for n in main) and key not in canonical:
                table[key] = found = main
            if main and len(found) > 1:
                preferred[key] = main
    weak = {k: v for k, v in weak.items() if k not in index}
    return ({k: ("school", tuple(sorted(v))) for k, v in index.items()},
            {k: ("school", tuple(sorted(v))) for k, v in weak.items()}, preferred)


def _program_indexes(programs) -> tuple[dict, dict]:
    """Program names, and their short forms (the part before the first comma) where no program has that name."""
    exact: dict[str, set[str]] = {}
    short: dict[str, set[str]] = {}
    for name in programs:
        exact.setdefault(" ".join(normalize(name)), set()).add(name)
        if "," in name:
            short.setdefault(" ".join(normalize(name.split(",")[0])), set()).add(name)
    return ({k: ("program", tuple(sorted(v))) for k, v in exact.items() if k},
            {k: ("program", tuple(sorted(v))) for k, v in short.items() if k and k not in exact})


def _phrase_index() -> dict[str, tuple[str, tuple[str, ...]]]:
    index = {" ".join(normalize(p)): ("credential_level", levels)
             for levels, phrases in CREDENTIAL_WORDS.items() for p in phrases}
    return index | {" ".join(normalize(name)): ("state", (code,)) for code, name in STATES.items()}


@dataclass
class Names:
    """The name indexes, matched in turn (`passes`: kind, index, its longest key in words)."""
    passes: list[tuple[str, dict, int]]
    preferred: dict[str, set[str]]  # school key -> its main campus, where it names several campuses
    short_schools: dict[str, tuple]  # school names with "University"/"College" left out -> ("school", names)
    program_words: dict[str, set[str]]  # program -> its words
    word_programs: dict[str, set[str]]  # word -> programs with it
    idf: dict[str, float]


@lru_cache(maxsize=1)
def names() -> Names:
    """Name indexes built from the Scorecard table (loaded once)."""
    table = load_table()
    programs = sorted({str(p).rstrip(".") for p in table["cip_desc"].dropna().unique()})
    sizes = table["inst_name"].value_counts().to_dict()
    (program_index, short_programs), phrases = _program_indexes(programs), _phrase_index()
    words = {p: set(normalize(p)) for p in programs}
    common = set().union(*words.values()) | NOT_PROGRAM_WORDS | SCHOOL_WORDS | {"community", "state"}
    strong, weak, preferred = _school_indexes(table["inst_name"].dropna().unique(), sizes,
                                              set(program_index) | set(short_programs) | set(phrases), common)
    # school names, and those of two words or more with "University"/"College" left out, first, longest first
    # ("Louisiana State University and Agricultural & Mechanical" over "Louisiana State University", "California
    # College of the Law" before "Law" is read, "Ohio State" before "Ohio"); then program names (and their short
    # forms), credential and state words in one pass, longest first ("Mathematics and Statistics" over
    # "Mathematics", "bachelor of science" over "Science"; on the same words a program's name wins)
    shortened = {k: v for k, v in weak.items() if len(k.split()) > 1}
    passes = [("school", shortened | strong), ("names", short_programs | phrases | program_index),
              ("school-one-word", weak)]
    counts = Counter(w for ws in words.values() for w in ws)
    word_programs: dict[str, set[str]] = {}
    for program, ws in words.items():
        for w in ws:
            word_programs.setdefault(w, set()).add(program)
    return Names([(kind, index, max(len(k.split()) for k in index)) for kind, index in passes], preferred, weak,
                 words, word_programs, {w: math.log(len(programs) / c) for w, c in counts.items()})


@dataclass
class Mention:
    field: str  # school | program | credential_level | state
    values: tuple[str, ...]
    start: int  # token span in the question
    end: int
    key: str  # the words matched


@dataclass
class Parse:
    """What a question names, and how exactly."""
    fields: dict[str, set[str]]  # school, program, credential_level, state, words -> values (retrieval's filters)
    schools: dict[str, float] = field(default_factory=dict)  # school name -> how exactly named (AS_WRITTEN...)
    levels: dict[str, float] = field(default_factory=dict)  # credential level -> how exactly named
    pairs: list[tuple[frozenset | None, frozenset | None]] = field(default_factory=list)  # (programs, levels)
    words: dict[str, float] = field(default_factory=dict)  # words that may name a program -> weight (idf)


def unused_spans(tokens: list[str], longest: int, used: list[bool]) -> Iterator[tuple[int, int, str]]:
    """(start, length, words joined) of each run of up to `longest` tokens none of which is `used`, longest first,
    then left to right; lazily, so a run the caller marks used as it goes is skipped by every run after it."""
    for n in range(min(longest, len(tokens)), 0, -1):
        for i in range(len(tokens) - n + 1):
            if not any(used[i:i + n]):
                yield i, n, " ".join(tokens[i:i + n])


def _longest_matches(tokens: list[str], index: dict, longest: int, used: list[bool], accept=None) -> list[Mention]:
    """The longest non-overlapping token runs found in `index` (and passing `accept`), marking their tokens used."""
    found = []
    for i, n, key in unused_spans(tokens, longest, used):
        value = index.get(key)
        if value is not None and (accept is None or accept(i, n)):
            found.append(Mention(value[0], tuple(value[1]), i, i + n, key))
            used[i:i + n] = [True] * n
    return found


def _mentions(question: str) -> tuple[list[str], list[Mention]]:
    """The question's tokens and the names found in it (`Names.passes` in turn)."""
    tokens = normalize(question)
    caps = _capitalized(question)
    caps = caps if len(caps) == len(tokens) else [False] * len(tokens)
    used = [False] * len(tokens)
    # a one-word school name ("Princeton"), last, and only where written with a capital, not first
    accept = {"school-one-word": lambda i, n: n == 1 and i > 0 and caps[i]}
    mentions = []
    for kind, index, longest in names().passes:
        mentions += _longest_matches(tokens, index, longest, used, accept.get(kind))
    for m in [m for m in mentions if m.field == "state" and m.start > 0 and tokens[m.start - 1] in AT_SCHOOL]:
        school = names().short_schools.get(f"?{m.key}")  # "at West Virginia": West Virginia University
        if school:
            mentions.append(Mention("school", school[1], m.start, m.end, f"?{m.key}"))
    for code in STATE_CODE.findall(question):
        if code in STATES:
            mentions.append(Mention("state", (code,), -1, -1, code))
    return tokens, mentions


def _pairs(mentions: list[Mention]) -> list[tuple[frozenset | None, frozenset | None]]:
    """(programs, levels) the question names together: each program with the credential word just before it
    (else just after it), a lone program with a lone credential word, degree words that name their field (BSN,
    MBA) as their program; programs and credential words left over pair with anything."""
    programs = sorted((m for m in mentions if m.field == "program"), key=lambda m: m.start)
    creds = sorted((m for m in mentions if m.field == "credential_level"), key=lambda m: m.start)
    paired: dict[int, Mention] = {}  # id(program mention) -> its credential mention
    free = list(creds)
    for before in (True, False):
        for p in programs:
            if id(p) in paired:
                continue
            near = [c for c in free if (0 <= p.start - c.end <= PAIR_GAP if before else 0 <= c.start - p.end <= 1)]
            if near:
                c = max(near, key=lambda c: c.start) if before else min(near, key=lambda c: c.start)
                paired[id(p)] = c
                free.remove(c)
    if len(programs) == 1 and len(free) == 1 and id(programs[0]) not in paired:
        paired[id(programs[0])] = free.pop()
    pairs = [(frozenset(p.values), frozenset(paired[id(p)].values) if id(p) in paired else None) for p in programs]
    for c in free:
        implied = _implied_programs(c.key)
        pairs.append((frozenset(implied) if implied else None, frozenset(c.values)))
    return pairs


def _implied_programs(key: str) -> tuple[str, ...]:
    words = DEGREE_FIELDS.get(key)
    if not words:
        return ()
    for _, index, _ in names().passes:
        field_, values = index.get(words, ("", ()))
        if field_ == "program":
            return values
    return ()


def _school_quality(question: str, mention: Mention) -> dict[str, float]:
    """How exactly the question names each school a mention may mean (AS_WRITTEN ... OTHER_CAMPUS)."""
    raw = " " + " ".join(_raw(question)) + " "
    main = names().preferred.get(mention.key, set())
    key = mention.key.replace(" at ", " ")
    out = {}
    for name in mention.values:
        if f" {' '.join(_raw(name))} " in raw:
            out[name] = AS_WRITTEN
        elif " ".join(normalize(name)).replace(" at ", " ") == key:  # spelling, dash, "at" or parentheses aside
            out[name] = SAME_NAME
        else:
            out[name] = MAIN if name in main else OTHER_CAMPUS if main else VARIANT
    return out


def parse(question: str) -> Parse:
    """The schools, programs, credential levels and state a question names, how exactly, and what goes with what."""
    tokens, mentions = _mentions(question)
    fields: dict[str, set[str]] = {f: set() for f in ("school", "program", "credential_level", "state", "words")}
    result = Parse(fields, pairs=_pairs(mentions))
    for m in mentions:
        fields[m.field].update(m.values)
        if m.field == "school":
            for name, q in _school_quality(question, m).items():
                result.schools[name] = max(q, result.schools.get(name, 0.0))
        elif m.field == "credential_level":
            for i, level in enumerate(m.values):
                q = EXACT_LEVEL if len(m.values) == 1 else FAMILY_FIRST if i == 0 else FAMILY_OTHER
                result.levels[level] = max(q, result.levels.get(level, 0.0))
    for programs, _ in result.pairs:
        fields["program"].update(programs or ())
    _program_words(tokens, mentions, result)
    return result


def _program_words(tokens: list[str], mentions: list[Mention], result: Parse) -> None:
    """Words that may name a program (not part of a school, credential or state named), weighted by rarity among
    program names; the programs with a rare one go to fields["words"]."""
    idx = names()
    taken = {i for m in mentions if m.field != "program" for i in range(m.start, m.end)}
    for i, word in enumerate(tokens):
        if i not in taken and word in idx.idf and word not in NOT_PROGRAM_WORDS:
            result.words[word] = idx.idf[word]
            if len(idx.word_programs[word]) <= RARE_WORD:
                result.fields["words"].update(idx.word_programs[word])


def parse_question(question: str) -> dict[str, list[str]]:
    """Metadata values a question names: {"school", "program", "credential_level", "state"} -> values."""
    fields = parse(question).fields
    return {f: sorted(fields[f]) for f in ("school", "program", "credential_level", "state")}
