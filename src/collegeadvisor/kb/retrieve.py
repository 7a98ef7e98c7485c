"""Retrieval: parse the school, program, credential and state a question names (kb.parse), filter on them, rank
the rows that pass by how exactly they match what the question names, then by vector.

Filters are relaxed step by step (RELAXATIONS, ending with pure vector search) until k hits are found,
so a wrong or partial parse costs precision, never the answer. Works on any `kb.store.Store`; what it returns is
`Hit`s, and `Retriever` (question -> hits) is all that advise, serve, eval and chat know of the knowledge base.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, Callable, Sequence, TypedDict

import numpy as np

from collegeadvisor.data.scorecard import load_table, row_metadata
from collegeadvisor.errors import AdvisorError
from collegeadvisor.kb.embed import embed
from collegeadvisor.kb.parse import Parse, names, normalize, parse, parse_question  # noqa: F401 (re-exported)
from collegeadvisor.kb.store import DOCUMENT_KIND, HAS_DOCUMENTS, Store, open_store


class Hit(TypedDict):
    """A retrieved Scorecard row or passage of an ingested document (a plain dict at run time)."""
    id: str  # the row_id, or `file:index` for a passage
    document: str  # the row's text (`data.scorecard.row_document`), or the passage
    metadata: dict[str, Any]  # a row's `row_metadata`; a passage's source, kind and chunk
    distance: float  # cosine distance to the question (0.0 for a row the question names, `advise.hit_of`)


Retriever = Callable[[str], Sequence[Hit]]  # question -> hits, best first: what advise, serve, eval and chat take

FIELDS = ("school", "program", "credential_level", "state")  # metadata keys a question can name
# Where-filters tried in turn until k rows are found; () is pure vector search. "words": the programs that share
# a rare word with the question, for a program named in other words than the table's.
RELAXATIONS = [
    ("school", "program", "credential_level", "state"), ("school", "program", "credential_level"),
    ("school", "program"), ("school", "words", "credential_level"), ("school", "words"),
    ("school", "credential_level"), ("school",),
    ("program", "credential_level", "state"), ("program", "credential_level"),
    ("words", "credential_level", "state"), ("credential_level", "state"), (),
]

GET_LIMIT = 512  # candidate sets up to this size are fetched by id and ranked here
OVERFETCH = 256  # nearest neighbours fetched unfiltered: passages, and candidates from broad filters
DOCUMENTS_TTL = 30.0  # seconds between checks for newly ingested passages


@lru_cache(maxsize=1)
def _row_index() -> dict[str, dict[str, frozenset[str]]]:
    """field -> value -> row ids, from the Scorecard table: filtering in memory takes microseconds, where
    Chroma's metadata filters scan every row (100-250 ms a query on the whole table)."""
    index: dict[str, dict[str, set[str]]] = {field: {} for field in FIELDS}
    for row in load_table().to_dict("records"):
        meta = row_metadata(row)
        for field in FIELDS:
            index[field].setdefault(meta[field], set()).add(meta["row_id"])
    return {field: {v: frozenset(ids) for v, ids in values.items()} for field, values in index.items()}


def _candidates(parsed: Parse):
    """Row-id sets from most to least specific (RELAXATIONS), ending with None (pure vector search); lazily,
    since most questions stop at the first, and intersecting from the smallest set keeps each one cheap."""
    index, tried = _row_index(), []
    for fields in RELAXATIONS:
        named = [f for f in fields if parsed.fields[f]]
        if not named:
            ids = None
        else:
            per_field = sorted(([index["program" if f == "words" else f].get(v, frozenset())
                                 for v in parsed.fields[f]] for f in named),
                               key=lambda sets: sum(map(len, sets)))
            ids = frozenset(i for first in per_field[0] for i in first
                            if all(any(i in s for s in sets) for sets in per_field[1:]))
        if ids not in tried and (ids is None or ids):
            tried.append(ids)
            yield ids
    if None not in tried:
        yield None


def _match(parsed: Parse, meta: dict) -> tuple:
    """How exactly a row matches what the question names, best highest: a credential + program named together,
    the school's name as written (the main campus when no campus is named), the exact credential over a family
    word, the state, and the weight of the question's words in the program's name."""
    program, level = meta.get("program"), meta.get("credential_level")
    pair = 0
    for programs, levels in parsed.pairs:
        if (programs is None or program in programs) and (levels is None or level in levels):
            pair = max(pair, (programs is not None) + (levels is not None))
    words = names().program_words.get(program, ())
    return (pair, parsed.schools.get(meta.get("school"), 0.0), parsed.levels.get(level, 0.0),
            meta.get("state") in parsed.fields["state"], sum(w for t, w in parsed.words.items() if t in words))


def _order(parsed: Parse, hits: list[Hit]) -> list[Hit]:
    """Hits by how exactly they match the question (`_match`), then by distance."""
    return sorted(hits, key=lambda h: (tuple(-x for x in _match(parsed, h["metadata"])), h["distance"]))


def _hits(ids, documents, metadatas, distances) -> list[Hit]:
    return [{"id": i, "document": d, "metadata": m, "distance": float(dist)}
            for i, d, m, dist in zip(ids, documents, metadatas, distances)]


def _rank(collection: Store, ids: frozenset[str], query: np.ndarray, parsed: Parse) -> list[Hit]:
    """The rows of `ids`, fetched by id (fast in Chroma), best match to the question first (`_order`)."""
    if not ids:  # Chroma refuses an empty list of ids
        return []
    got = collection.get(ids=sorted(ids), include=["documents", "metadatas", "embeddings"])
    if not got["ids"]:
        return []
    vectors = np.asarray(got["embeddings"], dtype=np.float32)
    distance = 1.0 - vectors @ query / np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
    return _order(parsed, _hits(got["ids"], got["documents"], got["metadatas"], distance))


def _has_documents(collection: Store) -> bool:
    """Whether the store holds ingested passages, re-checked at most every DOCUMENTS_TTL seconds."""
    checked, has = HAS_DOCUMENTS.get(id(collection), (float("-inf"), False))
    if time.monotonic() - checked > DOCUMENTS_TTL:
        has = bool(collection.get(where={"kind": DOCUMENT_KIND}, limit=1, include=[])["ids"])
        HAS_DOCUMENTS[id(collection)] = (time.monotonic(), has)
    return has


def retrieve(question: str, k: int = 5, collection: Store | None = None, *, path: str | None = None,
             url: str | None = None) -> list[Hit]:
    """Top-k Scorecard rows (and passages of ingested documents) for a question, best first.

    Each hit is {"id", "document", "metadata", "distance"}. Rows matching the school, program, credential
    and state named in the question come first (filters relaxed step by step, RELAXATIONS, applied here in
    memory: Chroma's metadata filters scan every row, 100-250 ms a query on the whole table); passages of
    ingested documents among the nearest neighbours that are closer than the farthest row take up to half of
    the places, each placed before the first row it is closer than.
    """
    collection = collection if collection is not None else open_store(path=path, url=url)
    query = embed([question])[0]
    near_cache: list[list[Hit]] = []

    def near() -> list[Hit]:  # nearest neighbours of the whole store, without filters, fetched once
        if not near_cache:
            r = collection.query(query_embeddings=[query.tolist()], n_results=max(OVERFETCH, k),
                                 include=["metadatas", "distances"])
            near_cache.append(_hits(r["ids"][0], [None] * len(r["ids"][0]), r["metadatas"][0], r["distances"][0]))
        return near_cache[0]

    hits: list[Hit] = []
    parsed = parse(question)
    for ids in _candidates(parsed):
        if len(hits) >= k:
            break
        seen = {h["id"] for h in hits}
        if ids is None:
            found = _order(parsed, [h for h in near() if h["metadata"].get("kind") != DOCUMENT_KIND])
        elif len(ids) <= GET_LIMIT:
            found = _rank(collection, ids - seen, query, parsed)
        else:  # a broad filter (a credential level, a common program): the nearest neighbours that pass it
            found = _order(parsed, [h for h in near() if h["id"] in ids])
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


def retriever(k: int = 5, path: str | None = None, url: str | None = None,
              collection: Store | None = None) -> Retriever:
    """question -> top-k hits, with the store (`collection`, else Chroma's at `path` or `url`) opened once; an empty
    or missing store is a clear error."""
    collection = collection if collection is not None else open_store(path=path, url=url)
    if collection.count() == 0:
        where = url or path or "kb_store"
        raise AdvisorError(f"the knowledge base at {where} is empty; build it first: collegeadvisor kb build"
                           + (f" --path {path}" if path else ""))
    return lambda question: retrieve(question, k=k, collection=collection)


def source_row_ids(question: dict) -> list[str]:
    """Row ids a held-out question is grounded on: source.row_id, plus source.compare_with.row_id, plus every
    row_id in source.rows."""
    source = question.get("source") or {}
    rows = [source, source.get("compare_with") or {}, *(source.get("rows") or [])]
    return [str(r["row_id"]) for r in rows if r.get("row_id") is not None]


def expected_rows(question: dict) -> tuple[list[str], list[str]]:
    """(rows that must all come back, rows of which any one will do) for a held-out question. A question that
    leaves the credential or campus open lists the rows it can mean in source.rows (with no source.row_id, or one
    among them) and is answered by any of them; every other question needs all of source_row_ids (a compare
    question: both rows)."""
    source = question.get("source") or {}
    options = [str(r["row_id"]) for r in source.get("rows") or [] if r.get("row_id") is not None]
    single = source.get("row_id")
    if options and question.get("kind") != "compare" and not source.get("compare_with") and \
            (single is None or str(single) in options):
        return [], options
    return source_row_ids(question), []


def right_first(question: dict, ids: list[str]) -> bool:
    """precision@1 for one question: its row is the first hit (a compare question: its rows are the first ones;
    an open question: the first hit is one of the rows it can mean)."""
    required, options = expected_rows(question)
    if options:
        return bool(ids) and ids[0] in options
    return bool(required) and set(required) <= set(ids[: len(required)])


def found_at_k(question: dict, ids: list[str], k: int) -> bool:
    """recall@k for one question: all its rows (or one of the rows an open question can mean) in the first k."""
    required, options = expected_rows(question)
    if options:
        return bool(set(options) & set(ids[:k]))
    return bool(required) and set(required) <= set(ids[:k])


def recall_at_k(questions: list[dict], k: int = 5, collection: Store | None = None, *, path: str | None = None,
                url: str | None = None) -> float:
    """Share of questions whose source rows are ALL among the top-k retrieved ids (compare: both rows; a question
    that leaves the credential or campus open: one of the rows it can mean)."""
    collection = collection if collection is not None else open_store(path=path, url=url)
    graded = [q for q in questions if any(expected_rows(q))]
    if not graded:
        return 0.0
    hits = 0
    for q in graded:
        hits += found_at_k(q, [h["id"] for h in retrieve(q["question"], k=k, collection=collection)], k)
    return hits / len(graded)
