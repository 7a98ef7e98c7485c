"""The names a question is matched against (kb.resolve): the Scorecard's school names and their variants
(`kb.parse`'s indexes), initialisms generated from them, program names, and the alias table kept as data
(`aliases.json`), built once from the table."""

from __future__ import annotations

from functools import lru_cache

from collegeadvisor.data.scorecard import load_table
from collegeadvisor.data.scorecard_text import alias_table
from collegeadvisor.kb.parse import CREDENTIAL_WORDS, STATES, _campus, _preferred, _shortened, names, normalize

COMMON = 4.5  # wordfreq zipf at or above which a word is an ordinary word, not a school's nickname
DOMINANT = 3.0  # an initialism shared by several schools means the one with this many times more rows
INITIAL_SKIP = {"of", "the", "at", "and", "&", "in", "for", "a", "an", "on"}


@lru_cache(maxsize=1)
def aliases() -> dict[str, dict]:
    return {kind: {" ".join(normalize(k)): v for k, v in entries.items()} for kind, entries in alias_table().items()}


@lru_cache(maxsize=1)
def zipf_of():
    from wordfreq import zipf_frequency  # delayed: its word lists load in 0.2 s
    return lambda word: zipf_frequency(word, "en")


def _initialisms(name: str) -> set[str]:
    """Initialisms a school goes by: its words' initials ("Florida State University" fsu, "University of
    California-Los Angeles" ucla) and, for "University of <State>", "u" and the state's code ("umn", "uga")."""
    out = set()
    base, _ = _campus(name)
    for words in (normalize(name), base.split()):
        letters = "".join(w[0] for w in words if w not in INITIAL_SKIP and w.isalpha())
        if len(letters) >= 3:
            out.add(letters)
    state_code = {" ".join(normalize(v)): k.lower() for k, v in STATES.items()}
    place = base[14:] if base.startswith("university of ") else ""
    if place in state_code:
        out.add("u" + state_code[place])
    if place and " " not in place:  # "uiowa", "umich"
        out |= {"u" + place, "u" + place[:4]}
    if place:  # "uofu", "u of sc"
        letters = "".join(w[0] for w in place.split() if w not in INITIAL_SKIP)
        out |= {"uof" + letters, "u of " + letters}
    return out


@lru_cache(maxsize=1)
def name_indexes() -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]], set[str]]:
    """(school key -> names, program key -> programs, the words of every name), from the table and the aliases."""
    table, idx, zipf = load_table(), names(), zipf_of()
    grouped = table.groupby("inst_name")["completers_count"]
    sizes = (grouped.sum() * grouped.size()).to_dict()  # graduates x programs: how well known a school is
    taken = set(aliases()["programs"]) | set(aliases()["credentials"]) | set(_credential_keys())
    schools: dict[str, tuple[str, ...]] = {}
    generated: dict[str, set[str]] = {}
    with_campus: dict[str, set[str]] = {}
    for name in table["inst_name"].dropna().unique():
        campus = _campus(name)[1].removesuffix(" campus")
        for key in _initialisms(name):
            if zipf(key) < COMMON and key not in taken:
                generated.setdefault(key, set()).add(name)
            if campus:  # "u of m twin cities": an initialism too common alone, with its campus names one school
                with_campus.setdefault(f"{key} {campus}", set()).add(name)
    for key, found in generated.items():
        schools[key] = _dominant(found, sizes)
    for key, found in with_campus.items():
        if len(found) == 1 and key not in schools:
            schools[key] = tuple(found)
    for key, (_, found) in idx.short_schools.items():  # one word, "University"/"College" left out
        if not key.startswith("?") and (len(key.split()) > 1 or (zipf(key) < COMMON and len(key) > 3)):
            schools[key] = _narrowed(key, found, sizes)  # "temple": Temple University, not Temple College
    for key, found in _at_campus_keys(table["inst_name"].dropna().unique(), sizes).items():
        schools.setdefault(key, found)
    for key, (_, found) in idx.passes[0][1].items():  # names, their variants, shortened ones of 2+ words
        schools[key] = _narrowed(key, found)
    schools.update({k: (v,) for k, v in aliases()["schools"].items()})
    programs: dict[str, tuple[str, ...]] = {}
    for key, (kind, found) in idx.passes[1][1].items():
        if kind == "program" and not _vague(key, found):
            programs[key] = tuple(found)
    for key, value in aliases()["programs"].items():  # after the exact names: "computer science" may also mean
        named = (value,) if isinstance(value, str) else tuple(value)  # "Computer and Information Sciences, General"
        programs[key] = tuple(dict.fromkeys(programs.get(key, ()) + named))
    words = {w for key in list(schools) + list(programs) for w in key.split() if w.isalpha()}
    return schools, programs, words


def _vague(key: str, found) -> bool:
    """A program's short form that is one ordinary word and not the program's plain name ("science" for "Science,
    Technology and Society"): it names no program by itself."""
    if " " in key or zipf_of()(key) < COMMON:
        return False
    plain = {" ".join(normalize(p)) for p in found} | {" ".join(normalize(p.split(",")[0])) for p in found
                                                        if p.split(",")[-1].strip() in ("General", "Other")}
    return key not in plain


def _credential_keys() -> list[str]:
    return [" ".join(normalize(p)) for phrases in CREDENTIAL_WORDS.values() for p in phrases]


def _at_campus_keys(all_names, sizes: dict[str, float]) -> dict[str, tuple[str, ...]]:
    """"Kent State University at Kent" is a campus of "Kent State University": the school's name, and its name with
    "University"/"College" left out ("kent state"), mean its campus with the most graduates."""
    groups: dict[str, set[str]] = {}
    for name in all_names:
        if " at " in name and "-" not in name:
            base = " ".join(normalize(name.split(" at ")[0]))
            for key in [base, *_shortened(base)]:
                if len(key.split()) > 1:
                    groups.setdefault(key, set()).add(name)
    return {k: (max(sorted(v), key=lambda n: sizes.get(n, 0)),) for k, v in groups.items()}


def _narrowed(key: str, found, sizes: dict | None = None) -> tuple[str, ...]:
    """The schools a name key means: its main campus where it names several campuses of one school; for a name
    with a word left out (`sizes` given), the far best-known school where several share it."""
    preferred = names().preferred.get(key)
    if preferred:
        return tuple(sorted(preferred))
    return _dominant(set(found), sizes) if sizes and len(set(found)) > 1 else tuple(sorted(found))


def _dominant(found: set[str], sizes: dict[str, int]) -> tuple[str, ...]:
    """An initialism's schools: each school's main campus, then the one with DOMINANT times more rows than the
    next, if any (people say "fsu" for Florida State University), else all of them."""
    by_base: dict[str, set[str]] = {}
    for name in found:
        by_base.setdefault(_campus(name)[0], set()).add(name)
    mains = sorted((_preferred(group, sizes) or group for group in by_base.values()), key=len)
    picked = sorted({n for group in mains for n in group}, key=lambda n: -sizes.get(n, 0))
    if len(picked) > 1 and sizes.get(picked[0], 0) >= DOMINANT * sizes.get(picked[1], 0):
        return (picked[0],)
    return tuple(sorted(picked))
