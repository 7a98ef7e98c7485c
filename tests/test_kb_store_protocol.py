"""The knowledge base behind `kb.Store`: Chroma's collection is one, and so is a store in plain Python (no chromadb).
The same build, ingest and retrieval code runs on both and finds the same hits, and what serve, eval and chat take
(`kb.Retriever`) works on the other store unchanged."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest

from collegeadvisor import advise
from collegeadvisor.data.scorecard import load_table, program_name
from collegeadvisor.errors import AdvisorError
from collegeadvisor.kb import Hit, Retriever, Store, build_kb, ingest_documents, open_store, retrieve, retriever

SCHOOLS = ["Augusta University", "Columbia College"]  # Columbia College: four schools of that name, four states
UNRESOLVED = "Is the $300 deposit refundable?"  # names no school nor a topic the data lacks: retrieval reads it
NOTES = ("# Campus visit\n\nThe dorms were loud but the library was open all night.\n\n"
         "## Housing deposit\n\nThe housing deposit of $300 is due by May 1 and is refundable until June 15.\n")


class MemoryStore:
    """A `kb.Store` in plain Python: documents, metadata and float32 unit vectors in dicts, exact cosine search."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, dict, np.ndarray]] = {}  # id -> (document, metadata, vector), insertion order
        self._metadata: dict = {}
        self.calls: list[str] = []  # which members kb called

    @property
    def metadata(self) -> dict | None:
        return dict(self._metadata) or None

    def modify(self, *, metadata: dict) -> None:
        self.calls.append("modify")
        self._metadata = dict(metadata)

    def count(self) -> int:
        self.calls.append("count")
        return len(self.rows)

    def add(self, *, ids, embeddings, documents, metadatas) -> None:
        self.calls.append("add")
        for i, vector, document, meta in zip(ids, embeddings, documents, metadatas, strict=True):
            self.rows.setdefault(i, (document, dict(meta), np.asarray(vector, dtype=np.float32)))

    def _matching(self, where) -> list[str]:
        return [i for i, (_, meta, _) in self.rows.items()
                if not where or all(meta.get(key) == value for key, value in where.items())]

    def delete(self, *, where) -> None:
        self.calls.append("delete")
        for i in self._matching(where):
            del self.rows[i]

    def _columns(self, ids: list[str], include) -> dict:
        out = {"ids": ids}
        if "documents" in include:
            out["documents"] = [self.rows[i][0] for i in ids]
        if "metadatas" in include:
            out["metadatas"] = [dict(self.rows[i][1]) for i in ids]
        if "embeddings" in include:
            out["embeddings"] = np.stack([self.rows[i][2] for i in ids]) if ids else np.zeros((0, 0), np.float32)
        return out

    def get(self, *, ids=None, where=None, limit=None, include=("metadatas", "documents")) -> dict:
        self.calls.append("get")
        found = [i for i in self._matching(where) if ids is None or i in set(ids)]
        return self._columns(found[:limit] if limit is not None else found, include)

    def query(self, *, query_embeddings, n_results, include=("metadatas", "documents", "distances")) -> dict:
        self.calls.append("query")
        ids = list(self.rows)
        vectors = np.stack([self.rows[i][2] for i in ids])
        out: dict = {"ids": []}
        for q in np.asarray(query_embeddings, dtype=np.float32):
            distance = 1.0 - vectors @ q / np.maximum(np.linalg.norm(vectors, axis=1) * np.linalg.norm(q), 1e-12)
            order = np.argsort(distance, kind="stable")[:n_results]
            columns = self._columns([ids[n] for n in order], include)
            for key, value in columns.items():
                out.setdefault(key, []).append(value)
            if "distances" in include:
                out.setdefault("distances", []).append([float(distance[n]) for n in order])
        return out


@pytest.fixture(scope="module")
def rows():
    df = load_table()
    return df[df["inst_name"].isin(SCHOOLS)].sample(frac=1.0, random_state=0).iloc[:120].reset_index(drop=True)


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    path = tmp_path_factory.mktemp("notes") / "visit-notes.md"
    path.write_text(NOTES)
    return path


@pytest.fixture(scope="module")
def chroma(tmp_path_factory, rows, notes):
    path = tmp_path_factory.mktemp("kb")
    build_kb(path, rows=rows, progress=False)
    ingest_documents([notes], path=path)
    return open_store(path)


@pytest.fixture(scope="module")
def memory(rows, notes):
    store = MemoryStore()
    stats = build_kb(rows=rows, progress=False, store=store)
    assert stats["added"] == stats["count"] == len(rows)
    assert ingest_documents([notes], store=store) == {"files": 1, "passages": 2, "count": len(rows) + 2}
    return store


def _question(row) -> str:
    return f"What do graduates of the {row['credential_desc']} in {program_name(row)} at {row['inst_name']} earn?"


def _ids(hits) -> list[str]:
    return [h["id"] for h in hits]


def test_chroma_and_a_memory_store_are_stores_with_the_members_kb_calls(chroma, memory):
    assert isinstance(chroma, Store) and isinstance(memory, Store)
    assert not isinstance(object(), Store) and not isinstance(lambda q: [], Store)
    assert type(chroma).__module__.startswith("chromadb") and "chromadb" not in type(memory).__module__
    # every keyword the protocol names is one Chroma's own methods take (isinstance checks the names only)
    for name, member in vars(Store).items():
        if name.startswith("_") or not inspect.isfunction(member):
            continue
        keywords = [p.name for p in inspect.signature(member).parameters.values() if p.kind is p.KEYWORD_ONLY]
        for store in (chroma, memory):
            inspect.signature(getattr(store, name)).bind(**dict.fromkeys(keywords))
    assert chroma.metadata["row_format"] == memory.metadata["row_format"]  # build recorded the same on both
    assert chroma.metadata["embedder"] == memory.metadata["embedder"]


def test_the_build_on_a_memory_store_writes_what_chroma_holds(chroma, memory, rows):
    ids = list(rows["row_id"].iloc[:10]) + ["visit-notes.md:1"]
    want = chroma.get(ids=ids, include=["documents", "metadatas", "embeddings"])
    got = memory.get(ids=ids, include=["documents", "metadatas", "embeddings"])
    by_id = {i: n for n, i in enumerate(got["ids"])}
    assert sorted(want["ids"]) == sorted(got["ids"]) == sorted(ids)
    for n, i in enumerate(want["ids"]):
        assert got["documents"][by_id[i]] == want["documents"][n]
        assert got["metadatas"][by_id[i]] == want["metadatas"][n]
        np.testing.assert_allclose(got["embeddings"][by_id[i]], want["embeddings"][n], atol=1e-6)
    assert memory.count() == chroma.count() == len(rows) + 2


def test_retrieval_on_a_memory_store_finds_what_it_finds_on_chroma(chroma, memory, rows):
    asked = rows.iloc[::12]
    for _, row in asked.iterrows():
        on_chroma, on_memory = retrieve(_question(row), k=5, collection=chroma), retrieve(_question(row), k=5,
                                                                                             collection=memory)
        assert on_memory[0]["id"] == row["row_id"], _question(row)
        assert _ids(on_memory) == _ids(on_chroma)
        assert [h["document"] for h in on_memory] == [h["document"] for h in on_chroma]
        assert [h["distance"] for h in on_memory] == pytest.approx([h["distance"] for h in on_chroma], abs=1e-4)
        assert all(set(h) == set(Hit.__annotations__) for h in on_memory)
    passage = retrieve(UNRESOLVED, k=3, collection=memory)  # the ingested passage, through query()
    assert passage[0]["id"] == "visit-notes.md:1" and "$300" in passage[0]["document"]
    assert _ids(passage) == _ids(retrieve(UNRESOLVED, k=3, collection=chroma))
    assert {"get", "query", "count"} <= set(memory.calls)


def test_retriever_on_a_memory_store_is_what_advise_takes_and_an_empty_one_is_a_clear_error(memory, rows):
    with pytest.raises(AdvisorError, match="is empty; build it first"):
        retriever(k=3, collection=MemoryStore())
    find: Retriever = retriever(k=3, collection=memory)
    row = rows.iloc[0]
    assert _ids(find(_question(row)))[0] == row["row_id"]
    unresolved = advise.plan([{"role": "user", "content": UNRESOLVED}], find)
    assert unresolved.decision == "retrieval"
    assert _ids(unresolved.hits) == _ids(retrieve(UNRESOLVED, k=3, collection=memory))
    assert unresolved.hits[0]["metadata"]["source"] == "visit-notes.md" and "$300" in unresolved.passages[0]


def test_serve_eval_and_chat_answer_from_a_memory_store(trained_run, memory):
    """The stages as they are, with a Retriever over the memory store: the passage only it holds comes back."""
    from fastapi.testclient import TestClient

    from collegeadvisor.chat import chat_loop
    from collegeadvisor.eval.run import replies_for
    from collegeadvisor.runs import load_run
    from collegeadvisor.serve.app import create_app

    asked: list[str] = []
    find = retriever(k=3, collection=memory)

    def spy(question: str) -> list[Hit]:
        asked.append(question)
        return list(find(question))

    want = _ids(retrieve(UNRESOLVED, k=3, collection=memory))
    model, tok, manifest = load_run(trained_run)
    with TestClient(create_app(model, tok, manifest, retriever=spy, max_tokens_limit=16)) as client:
        assert client.get("/health").json()["rag"] is True
        body = client.post("/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": UNRESOLVED}], "max_tokens": 8}).json()
    assert [s["id"] for s in body["sources"]] == want
    assert body["sources"][0]["school"] == "visit-notes.md" and "$300" in body["sources"][0]["snippet"]

    replies, hits, _ = replies_for(model, tok, [{"question": UNRESOLVED}], max_new_tokens=8, batch_size=1,
                                   retriever=spy)
    assert _ids(hits[0]) == want and replies[0]["resolution"]["decision"] == "retrieval"

    out = io.StringIO()
    assert chat_loop(model, tok, io.StringIO(UNRESOLVED + "\n"), out, max_new_tokens=8, retriever=spy) == 1
    assert "(retrieval; no school or program resolved)" in out.getvalue()
    assert asked == [UNRESOLVED] * 3  # serve, eval and chat each asked the memory store once
