"""Knowledge base: College Scorecard rows and the user's documents in Chroma, found by question."""

from collegeadvisor.kb.embed import embed, load_embedder
from collegeadvisor.kb.retrieve import parse_question, recall_at_k, retrieve, retriever, source_row_ids
from collegeadvisor.kb.store import (
    DEFAULT_COLLECTION,
    DEFAULT_PATH,
    build_kb,
    ingest_documents,
    kb_info,
    key_texts,
    open_store,
    row_vectors,
    split_passages,
)

__all__ = [
    "DEFAULT_COLLECTION",
    "DEFAULT_PATH",
    "build_kb",
    "embed",
    "ingest_documents",
    "kb_info",
    "key_texts",
    "load_embedder",
    "open_store",
    "parse_question",
    "recall_at_k",
    "retrieve",
    "retriever",
    "row_vectors",
    "source_row_ids",
    "split_passages",
]
