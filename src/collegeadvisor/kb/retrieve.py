"""Retrieval: parse the school, program, credential and state a question names, filter on them, rank by vector.

Filters are relaxed step by step (RELAXATIONS, ending with pure vector search) until k hits are found,
so a wrong or partial parse costs precision, never the answer.
"""

from __future__ import annotations

import re
import time
from functools import lru_cache
from typing import Any

import numpy as np

from collegeadvisor.kb.embed import embed
from collegeadvisor.kb.store import DOCUMENT_KIND, HAS_DOCUMENTS, open_store

# Spelling variants folded together before names and questions are compared.
TOKEN_EQUIV = {"saint": "st", "mount": "mt", "fort": "ft", "&": "and"}

# Credential words (normalized) -> Scorecard credential_level codes; the longest phrase wins.
CREDENTIAL_WORDS = {
    ("1",): ["undergraduate certificate", "undergraduate diploma", "diploma"],
    ("2",): ["associate", "associates", "associate degree", "aas", "two year degree"],
    ("3",): ["bachelor", "bachelors", "baccalaureate", "ba", "bs", "bsn", "bfa", "bba", "four year degree",
          "undergraduate degree"],
    ("4",): ["post baccalaureate certificate", "postbaccalaureate certificate", "post baccalaureate", "post bacc",
          "post bacc certificate"],
    ("5",): ["master", "masters", "ma", "ms", "msn", "mba", "mfa", "mph"],
    ("6",): ["doctoral", "doctorate", "phd", "ph d", "doctor of philosophy", "edd"],
    ("7",): ["first professional", "professional degree", "jd", "md", "dds", "dmd", "pharmd", "dvm", "law degree",
          "medical degree"],
    ("8",): ["graduate certificate", "professional certificate", "graduate professional certificate"],
    ("99",): ["non credential", "noncredential", "preparatory coursework", "teacher certification"],
    ("1", "4", "8"): ["certificate", "certificates"],
    ("5", "6"): ["graduate degree"],
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

FIELDS = ("school", "program", "credential_level", "state")  # metadata keys a question can name
# Where-filters tried in turn until k rows are found; () is pure vector search.
RELAXATIONS = [
    ("school", "program", "credential_level", "state"), ("school", "program", "credential_level"),
    ("school", "program"), ("school", "credential_level"), ("school",),
    ("program", "credential_level", "state"), ("program", "credential_level"), ("credential_level", "state"), (),
]

GET_LIMIT = 512  # candidate sets up to this size are fetched by id and ranked here
OVERFETCH = 256  # nearest neighbours fetched unfiltered: passages, and candidates from broad filters
DOCUMENTS_TTL = 30.0  # seconds between checks for newly ingested passages
# "School-Campus" names: a question naming only the school means its main campus, or else all campuses.
MAIN_CAMPUS = {"main campus", "main"}
SCHOOL_WORDS = {"university", "college", "institute", "school", "academy", "seminary", "conservatory"}
# Leading words of a name a question may drop, and name forms that swap ("University of X" <-> "X University").
DROPPABLE_PREFIXES = ("the ",)
SWAPPABLE = ("university", "college")


def normalize(text: str) -> list[str]:
    """Lowercase word tokens with punctuation dropped and spelling variants folded."""
    text = text.lower().replace("&", " & ").replace("'", "").replace("\u2019", "")
    tokens = re.findall(r"[a-z0-9]+|&", text)
    return [TOKEN_EQUIV.get(t, t) for t in tokens]


def _campus(name: str) -> tuple[str, str]:
    """("school", "campus") for "School-Campus" names whose school part names a school, else (name, "")."""
    base, _, campus = name.rpartition("-")
    base_tokens = normalize(base)
    if not base or not SCHOOL_WORDS & set(base_tokens):
        return " ".join(normalize(name)), ""
    return " ".join(base_tokens), " ".join(normalize(campus))


def _aliases(name: str) -> set[str]:
    forms = {" ".join(normalize(name)), _campus(name)[0]}
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


def _school_index(names) -> dict[str, tuple[str, list[str]]]:
    """Normalized name or alias -> ("school", the names it may mean); exact names beat aliases."""
    canonical = {" ".join(normalize(n)): n for n in names}
    index: dict[str, set[str]] = {key: {name} for key, name in canonical.items()}
    for name in names:
        for alias in _aliases(name) - canonical.keys():
            index.setdefault(alias, set()).add(name)
    for alias, found in index.items():
        main = {n for n in found if _campus(n)[1] in MAIN_CAMPUS}
        if main and len(found) > 1:
            index[alias] = main
    return {alias: ("school", sorted(found)) for alias, found in index.items()}


def _phrase_index() -> dict[str, tuple[str, list[str]]]:
    index = {" ".join(normalize(p)): ("credential_level", list(levels))
             for levels, phrases in CREDENTIAL_WORDS.items() for p in phrases}
    return index | {" ".join(normalize(name)): ("state", [code]) for code, name in STATES.items()}


@lru_cache(maxsize=1)
def _indexes() -> list[tuple[dict[str, tuple[str, list[str]]], int]]:
    """Phrase indexes matched in turn (schools, then programs, then credential and state words), each with
    its longest phrase in tokens; school and program names come from the Scorecard table."""
    from collegeadvisor.data.scorecard import load_table

    table = load_table()
    programs = {}
    for name in table["cip_desc"].dropna().unique():
        name = str(name).rstrip(".")
        programs.setdefault(" ".join(normalize(name)), ("program", []))[1].append(name)
    indexes = [_school_index(table["inst_name"].dropna().unique()), programs, _phrase_index()]
    return [(index, max(len(key.split()) for key in index)) for index in indexes]


def _longest_matches(tokens: list[str], index: dict, longest: int, used: list[bool]) -> list[Any]:
    """Values of the longest non-overlapping token runs found in `index`, marking their tokens used."""
    found = []
    for n in range(min(longest, len(tokens)), 0, -1):
        for i in range(len(tokens) - n + 1):
            if any(used[i:i + n]):
                continue
            value = index.get(" ".join(tokens[i:i + n]))
            if value is not None:
                found.append(value)
                used[i:i + n] = [True] * n
    return found


def parse_question(question: str) -> dict[str, list[str]]:
    """Metadata values a question names: {"school", "program", "credential_level", "state"} -> values."""
    tokens = normalize(question)
    used = [False] * len(tokens)
    parsed: dict[str, set[str]] = {field: set() for field in FIELDS}
    for index, longest in _indexes():
        for field, values in _longest_matches(tokens, index, longest, used):
            parsed[field].update(values)
    for code in re.findall(r"(?:,\s*|\()([A-Z]{2})\b", question):
        if code in STATES:
            parsed["state"].add(code)
    return {field: sorted(values) for field, values in parsed.items()}


@lru_cache(maxsize=1)
def _row_index() -> dict[str, dict[str, frozenset[str]]]:
    """field -> value -> row ids, from the Scorecard table: filtering in memory takes microseconds, where
    Chroma's metadata filters scan every row (100-250 ms a query on the whole table)."""
    from collegeadvisor.data.scorecard import load_table, row_metadata

    index: dict[str, dict[str, set[str]]] = {field: {} for field in FIELDS}
    for row in load_table().to_dict("records"):
        meta = row_metadata(row)
        for field in FIELDS:
            index[field].setdefault(meta[field], set()).add(meta["row_id"])
    return {field: {v: frozenset(ids) for v, ids in values.items()} for field, values in index.items()}


def _candidates(parsed: dict[str, list[str]]):
    """Row-id sets from most to least specific (RELAXATIONS), ending with None (pure vector search); lazily,
    since most questions stop at the first, and intersecting from the smallest set keeps each one cheap."""
    index, tried = _row_index(), []
    for fields in RELAXATIONS:
        named = [f for f in fields if parsed[f]]
        if not named:
            ids = None
        else:
            per_field = sorted(([index[f].get(v, frozenset()) for v in parsed[f]] for f in named),
                               key=lambda sets: sum(map(len, sets)))
            ids = frozenset(i for first in per_field[0] for i in first
                            if all(any(i in s for s in sets) for sets in per_field[1:]))
        if ids not in tried and (ids is None or ids):
            tried.append(ids)
            yield ids
    if None not in tried:
        yield None


def _hits(ids, documents, metadatas, distances) -> list[dict]:
    return [{"id": i, "document": d, "metadata": m, "distance": float(dist)}
            for i, d, m, dist in zip(ids, documents, metadatas, distances)]


def _rank(collection, ids: frozenset[str], query: np.ndarray, n: int) -> list[dict]:
    """The n rows of `ids` nearest the query: fetched by id (fast in Chroma), ranked here by cosine distance."""
    got = collection.get(ids=sorted(ids), include=["documents", "metadatas", "embeddings"])
    if not got["ids"]:
        return []
    vectors = np.asarray(got["embeddings"], dtype=np.float32)
    distance = 1.0 - vectors @ query / np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    order = np.argsort(distance, kind="stable")[:n]
    return _hits(*([got[key][i] for i in order] for key in ("ids", "documents", "metadatas")), distance[order])


def _has_documents(collection) -> bool:
    """Whether the store holds ingested passages, re-checked at most every DOCUMENTS_TTL seconds."""
    checked, has = HAS_DOCUMENTS.get(id(collection), (float("-inf"), False))
    if time.monotonic() - checked > DOCUMENTS_TTL:
        has = bool(collection.get(where={"kind": DOCUMENT_KIND}, limit=1, include=[])["ids"])
        HAS_DOCUMENTS[id(collection)] = (time.monotonic(), has)
    return has


def retrieve(question: str, k: int = 5, collection=None, *, path: str | None = None,
             url: str | None = None) -> list[dict]:
    """Top-k Scorecard rows (and passages of ingested documents) for a question, best first.

    Each hit is {"id", "document", "metadata", "distance"}. Rows matching the school, program, credential
    and state named in the question come first (filters relaxed step by step, RELAXATIONS, applied here in
    memory: Chroma's metadata filters scan every row, 100-250 ms a query on the whole table); passages of
    ingested documents among the nearest neighbours that are closer than the farthest row take up to half of
    the places, each placed before the first row it is closer than.
    """
    collection = collection if collection is not None else open_store(path=path, url=url)
    query = embed([question])[0]
    near_cache: list[list[dict]] = []

    def near() -> list[dict]:  # nearest neighbours of the whole store, without filters, fetched once
        if not near_cache:
            r = collection.query(query_embeddings=[query.tolist()], n_results=max(OVERFETCH, k),
                                 include=["metadatas", "distances"])
            near_cache.append(_hits(r["ids"][0], [None] * len(r["ids"][0]), r["metadatas"][0], r["distances"][0]))
        return near_cache[0]

    hits: list[dict] = []
    for ids in _candidates(parse_question(question)):
        if len(hits) >= k:
            break
        seen = {h["id"] for h in hits}
        if ids is None:
            found = [h for h in near() if h["metadata"].get("kind") != DOCUMENT_KIND]
        elif len(ids) <= GET_LIMIT:
            found = _rank(collection, ids - seen, query, k - len(hits))
        else:  # a broad filter (a credential level, a common program): the nearest neighbours that pass it
            found = [h for h in near() if h["id"] in ids]
        hits += [h for h in found if h["id"] not in seen][: k - len(hits)]
    passages = []
    if _has_documents(collection):
        worst = max((h["distance"] for h in hits), default=float("inf"))
        passages = [h for h in near() if h["metadata"].get("kind") == DOCUMENT_KIND and h["distance"] < worst]
        passages = passages[: k // 2] if hits else passages[:k]
    hits = hits[: k - len(passages)]
    for passage in passages:  # before the first row it is closer than
        at = next((i for i, h in enumerate(hits) if h["distance"] > passage["distance"]), len(hits))
        hits.insert(at, passage)
    missing = [h["id"] for h in hits if h["document"] is None]
    if missing:
        got = collection.get(ids=missing, include=["documents"])
        documents = dict(zip(got["ids"], got["documents"]))
        for h in hits:
            h["document"] = documents.get(h["id"], h["document"]) if h["document"] is None else h["document"]
    return hits


def retriever(k: int = 5, path: str | None = None, url: str | None = None, collection=None):
    """question -> top-k hits, with the store opened once; an empty or missing store is a clear error."""
    from collegeadvisor.errors import AdvisorError

    collection = collection if collection is not None else open_store(path=path, url=url)
    if collection.count() == 0:
        where = url or path or "kb_store"
        raise AdvisorError(f"the knowledge base at {where} is empty; build it first: collegeadvisor kb build"
                           + (f" --path {path}" if path else ""))
    return lambda question: retrieve(question, k=k, collection=collection)


def source_row_ids(question: dict) -> list[str]:
    """Row ids a held-out question is grounded on: source.row_id, plus source.compare_with.row_id or every
    row_id in source.rows for compare questions."""
    source = question.get("source") or {}
    rows = [source, source.get("compare_with") or {}, *(source.get("rows") or [])]
    return [str(r["row_id"]) for r in rows if r.get("row_id") is not None]


def recall_at_k(questions: list[dict], k: int = 5, collection=None, *, path: str | None = None,
                url: str | None = None) -> float:
    """Share of questions whose source rows are ALL among the top-k retrieved ids (compare: both rows)."""
    collection = collection if collection is not None else open_store(path=path, url=url)
    graded = [q for q in questions if source_row_ids(q)]
    if not graded:
        return 0.0
    hits = 0
    for q in graded:
        ids = {h["id"] for h in retrieve(q["question"], k=k, collection=collection)}
        hits += set(source_row_ids(q)) <= ids
    return hits / len(graded)
