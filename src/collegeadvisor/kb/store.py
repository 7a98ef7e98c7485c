"""The Chroma store: one document per Scorecard row, plus passages of the user's own documents.

A row is found by what questions name: its school (with state) and its credential + program. Each of the
two key texts is embedded once (~5.6k schools, ~2.7k programs instead of 221k rows) and a row's vector is
the normalized sum of its two parts, so the full table embeds in seconds; Chroma stores the full
`row_document` as the document, so a query finds the row and returns every fact.

`Store` is what the rest of kb asks of a vector store; `open_store` gives Chroma's collection, which is one as it
is. Another vector database is a class with `Store`'s members, opened by `open_store`: retrieval (`kb.retrieve`)
takes any `Store`, and serve, eval and chat see only `kb.Retriever`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable
from urllib.parse import urlparse

import numpy as np

from collegeadvisor.data.scorecard import load_table, row_document, row_format_id, row_metadata
from collegeadvisor.errors import AdvisorError, DataError, missing_dependency
from collegeadvisor.kb.embed import embed
from collegeadvisor.models import EMBEDDING_MODEL

DEFAULT_PATH = "kb_store"
DEFAULT_COLLECTION = "scorecard"
DOCUMENT_KIND = "document"  # metadata "kind" of ingested passages; Scorecard rows carry none
HAS_DOCUMENTS: dict[int, tuple[float, bool]] = {}  # retrieval's cache: id(collection) -> (checked at, has passages)
TEXT_SUFFIXES = {".md", ".markdown", ".txt"}


@runtime_checkable
class Store(Protocol):
    """A vector store of Scorecard rows and passages, each an id with a document, a metadata dict and a unit vector,
    plus the store's own metadata (the embedder and row format a build recorded, `_stamp`). The members are the
    ones kb uses of Chroma's collection, with its arguments and its results: plain dicts of lists, `get` ->
    {"ids", and each of `include` ("documents", "metadatas", "embeddings")}, `query` -> the same keys with one list
    per query vector, and "distances" (cosine). A `where` is one equality on a metadata key ({"kind": "document"},
    {"source": name}); `include=[]` asks for the ids only."""

    @property
    def metadata(self) -> Mapping[str, Any] | None: ...

    def modify(self, *, metadata: dict[str, Any]) -> None: ...

    def count(self) -> int: ...

    def add(self, *, ids: list[str], embeddings: Any, documents: list[str],
            metadatas: list[dict[str, Any]]) -> None: ...

    def delete(self, *, where: dict[str, Any]) -> Any: ...

    def get(self, *, ids: list[str] | None = None, where: dict[str, Any] | None = None, limit: int | None = None,
            include: Sequence[str] = ("metadatas", "documents")) -> Mapping[str, Any]: ...

    def query(self, *, query_embeddings: list[list[float]], n_results: int,
              include: Sequence[str] = ("metadatas", "documents", "distances")) -> Mapping[str, Any]: ...


CHROMA_SQLITE = (3, 35, 0)  # the oldest sqlite3 Chroma accepts
STORE_FILE = "chroma.sqlite3"  # what a Chroma folder holds


def use_pysqlite3_if_needed() -> None:
    """Chroma refuses a sqlite3 older than 3.35; where Python's is and `pysqlite3-binary` is installed, import
    that in its place (Chroma's documented workaround). Call before chromadb is imported."""
    import sqlite3  # here, not at the top: whichever sqlite3 sys.modules holds now (this may swap it)

    if sqlite3.sqlite_version_info >= CHROMA_SQLITE:
        return
    try:
        __import__("pysqlite3")
    except ImportError:
        return
    sys.modules["sqlite3"] = sys.modules.pop("pysqlite3")


def probe_chromadb() -> None:
    """Print what a subprocess needs to judge this Python's chromadb (check.check_chromadb runs this in one, where
    a crash or a refused sqlite3 cannot take the preflight down): where it is, its version, or its import error."""
    import sqlite3  # as in use_pysqlite3_if_needed

    use_pysqlite3_if_needed()
    print("sqlite", sys.modules.get("sqlite3", sqlite3).sqlite_version, flush=True)
    spec = importlib.util.find_spec("chromadb")
    print("chromadb-at", spec.origin if spec else None, flush=True)
    if spec is None:
        return
    try:  # chromadb (heavy, and what this probes): only here
        import chromadb
        from chromadb.config import Settings

        chromadb.EphemeralClient(settings=Settings(anonymized_telemetry=False)).heartbeat()
    except BaseException as exc:  # noqa: BLE001 - reported, whatever it is
        print("chromadb-error", f"{type(exc).__name__}: {' '.join(str(exc).split())}", flush=True)
        raise SystemExit(3) from None
    print("chromadb-ok", getattr(chromadb, "__version__", "?"), flush=True)


def _client(path: str | Path | None = None, url: str | None = None):
    """A Chroma client: on disk at `path` (created when missing), or on the server at `url`."""
    use_pysqlite3_if_needed()
    try:  # chromadb: heavy, and only after use_pysqlite3_if_needed
        import chromadb
        from chromadb.config import Settings
    except ImportError as exc:
        raise missing_dependency("chromadb") from exc
    settings = Settings(anonymized_telemetry=False)
    if url:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise AdvisorError(f"kb url {url!r}: expected http://host:port")
        try:
            client = chromadb.HttpClient(
                host=parsed.hostname,
                port=parsed.port or (443 if parsed.scheme == "https" else 8000),
                ssl=parsed.scheme == "https",
                settings=settings,
            )
        except ValueError as exc:
            raise AdvisorError(f"kb url {url!r}: {exc}") from exc
    else:
        client = chromadb.PersistentClient(path=str(path or DEFAULT_PATH), settings=settings)
    return client


def open_store(path: str | Path | None = None, url: str | None = None, collection: str = DEFAULT_COLLECTION) -> Store:
    """The store: Chroma's collection (cosine space, precomputed embeddings), on disk at `path`, or on the server at
    `url`."""
    client = _client(path, url)
    import chromadb  # imported by _client (heavy: never at module import)

    try:
        return client.get_or_create_collection(
            collection,
            embedding_function=None,
            configuration={"hnsw": {"space": "cosine"}},
            metadata={"embedder": EMBEDDING_MODEL},
        )
    except chromadb.errors.InvalidArgumentError as exc:
        raise AdvisorError(f"kb collection {collection!r}: {exc}") from exc


def kb_info(path: str | Path | None = None, url: str | None = None, collection: str = DEFAULT_COLLECTION) -> dict:
    """What a knowledge base holds, opened without creating anything: {"where", "exists", "rows" (Scorecard
    rows), "passages" (ingested), "embedder", "row_format"} (the last two as recorded at build, else None).
    A folder without a Chroma store, or a store without the collection, is reported missing."""
    where = url or str(path or DEFAULT_PATH)
    info = {"where": where, "exists": False, "rows": 0, "passages": 0, "embedder": None, "row_format": None}
    if not url and not (Path(where) / STORE_FILE).is_file():
        return info
    client = _client(path, url)
    try:
        store = client.get_collection(collection)
    except Exception as exc:  # chromadb.errors.NotFoundError (ValueError in older versions)
        if "does not exist" in str(exc):
            return info
        raise AdvisorError(f"kb at {where}: cannot open collection {collection!r}: {exc}") from exc
    meta = store.metadata or {}
    passages = len(store.get(where={"kind": DOCUMENT_KIND}, include=[])["ids"])
    return info | {"exists": True, "rows": store.count() - passages, "passages": passages,
                   "embedder": meta.get("embedder"), "row_format": meta.get("row_format")}


def _stamp(store: Store, rows, where: str) -> None:
    """Record the embedder and row format (`row_format_id`) in the collection's metadata at build. A store that
    holds rows already keeps what it recorded: another embedder or row format is an error (a build only adds
    missing rows: it would mix two); one built before builds recorded them is stamped when its documents read as
    this version writes them, and left unrecorded when none of the rows to build is there to compare."""
    meta = dict(store.metadata or {})
    want = {"embedder": EMBEDDING_MODEL, "row_format": row_format_id()}
    if store.count():
        stored = {}
        if meta.get("row_format") is None:
            sample = rows.head(200).to_dict("records")
            got = store.get(ids=[r["row_id"] for r in sample], include=["documents"])
            stored = dict(zip(got["ids"], got["documents"]))
            if any(stored[r["row_id"]] != row_document(r) for r in sample if r["row_id"] in stored):
                meta["row_format"] = "an older one"
        for key, value in want.items():
            if meta.get(key) not in (None, value):
                raise AdvisorError(f"the knowledge base at {where} was built with {key} {meta[key]!r}, this version "
                                   f"writes {value!r}: build into a new folder (collegeadvisor kb build --path NEW) "
                                   f"or delete {where} first")
        if meta.get("row_format") is None and not stored:
            return
    if any(meta.get(k) != v for k, v in want.items()):
        store.modify(metadata=meta | want)


def key_texts(row) -> tuple[str, str]:
    """What a row is found by: its school (with state), and its credential + program."""
    state = row["state"] if isinstance(row["state"], str) else ""
    school = f"{row['inst_name']} ({state})" if state else str(row["inst_name"])
    return school, f"{row['credential_desc']} in {str(row['cip_desc']).rstrip('.')}"


def row_vectors(rows: list[dict], cache: dict[str, np.ndarray]) -> np.ndarray:
    """Unit vectors for rows: the sum of their school and program embeddings (`cache` saves repeats)."""
    keys = [key_texts(r) for r in rows]
    new = sorted({text for pair in keys for text in pair} - cache.keys())
    if new:
        cache.update(zip(new, embed(new)))
    vectors = np.stack([cache[school] + cache[program] for school, program in keys])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build_kb(path: str | Path | None = None, url: str | None = None, rows=None, batch_size: int = 2048,
             progress: bool = True, collection: str = DEFAULT_COLLECTION, *, store: Store | None = None) -> dict:
    """Add every Scorecard row (default: the full table) not already in the store (`store`, else Chroma's at `path`
    or `url`); returns build stats.

    Resumable: ids already present are skipped, so an interrupted build continues where it stopped.
    """
    from tqdm import tqdm  # ~25 ms: kept off the CLI's start (which imports kb)

    store = store if store is not None else open_store(path, url, collection)
    rows = (load_table() if rows is None else rows).drop_duplicates("row_id")
    _stamp(store, rows, url or str(path or DEFAULT_PATH))
    start, added, cache = time.perf_counter(), 0, {}
    with tqdm(total=len(rows), desc="kb build", unit="row", disable=not progress) as bar:
        for first in range(0, len(rows), batch_size):
            batch = rows.iloc[first:first + batch_size].to_dict("records")
            try:  # each add is one transaction: a failure (disk full, I/O error) keeps every row added before
                present = set(store.get(ids=[r["row_id"] for r in batch], include=[])["ids"])
                todo = [r for r in batch if r["row_id"] not in present]
                if todo:
                    store.add(
                        ids=[r["row_id"] for r in todo],
                        embeddings=row_vectors(todo, cache),
                        documents=[row_document(r) for r in todo],
                        metadatas=[row_metadata(r) for r in todo],
                    )
            except Exception as exc:
                if isinstance(exc, AdvisorError):
                    raise
                raise AdvisorError(f"kb build: cannot write to {url or path or DEFAULT_PATH}: {exc}; the rows added "
                                   "before this batch are kept, and running `kb build` again continues") from exc
            added += len(todo)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    return {
        "rows": len(rows),
        "added": added,
        "skipped": len(rows) - added,
        "count": store.count(),
        "seconds": round(seconds, 1),
        "rows_per_s": round(added / seconds, 1) if added else 0.0,
    }


def split_passages(text: str, max_chars: int = 500) -> list[str]:
    """Markdown/plain text as passages of about `max_chars`: by heading, then paragraph, then sentence."""
    passages = []
    for section in re.split(r"(?m)^(?=#{1,6}\s)", text):
        heading = section.split("\n", 1)[0].strip() if section.startswith("#") else ""
        pieces = []
        for para in re.split(r"\n\s*\n", section):
            para = " ".join(para.split())
            while len(para) > max_chars:
                cut = para.rfind(". ", 0, max_chars) + 1 or para.rfind(" ", 0, max_chars) + 1 or max_chars
                pieces.append(para[:cut].strip())
                para = para[cut:].strip()
            if para:
                pieces.append(para)
        chunk = ""
        for piece in pieces:
            if chunk and len(chunk) + len(piece) + 1 > max_chars:
                passages.append(chunk)
                chunk = heading if heading and piece != heading else ""
            chunk = f"{chunk}\n{piece}" if chunk else piece
        if chunk and chunk != heading:
            passages.append(chunk)
    return passages


def ingest_documents(paths: list[Path], path: str | Path | None = None, url: str | None = None,
                     collection: str = DEFAULT_COLLECTION, max_chars: int = 500, *, store: Store | None = None) -> dict:
    """Add Markdown/text files as passages (id `name:index`, metadata source=name) to `store` (else Chroma's at
    `path` or `url`); re-ingesting replaces a file."""
    texts = {}
    for file in map(Path, paths):
        if file.suffix.lower() not in TEXT_SUFFIXES:
            raise DataError(f"{file}: unsupported file type (expected {', '.join(sorted(TEXT_SUFFIXES))})")
        try:
            texts[file] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{file}: cannot read as UTF-8 text ({exc.__class__.__name__})") from exc
        if not texts[file].strip():
            raise DataError(f"{file}: the file has no text")
    store = store if store is not None else open_store(path, url, collection)
    total = 0
    for file, text in texts.items():
        passages = split_passages(text, max_chars)
        store.delete(where={"source": file.name})
        store.add(
            ids=[f"{file.name}:{i}" for i in range(len(passages))],
            embeddings=embed(passages),
            documents=passages,
            metadatas=[{"source": file.name, "kind": DOCUMENT_KIND, "chunk": i} for i in range(len(passages))],
        )
        total += len(passages)
    HAS_DOCUMENTS.clear()  # retrieval in this process sees the new passages at once
    return {"files": len(texts), "passages": total, "count": store.count()}
