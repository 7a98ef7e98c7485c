"""Knowledge base: College Scorecard rows and the user's documents in a `Store` (Chroma's), found by question:
a `Retriever` (question -> `Hit`s) is what the stages above take."""

from collegeadvisor.kb.embed import embed, load_embedder
from collegeadvisor.kb.retrieve import (
    Hit,
    Retriever,
    parse_question,
    recall_at_k,
    retrieve,
    retriever,
    source_row_ids,
)
from collegeadvisor.kb.store import (
    DEFAULT_COLLECTION,
    DEFAULT_PATH,
    Store,
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
    "Hit",
    "Retriever",
    "Store",
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
