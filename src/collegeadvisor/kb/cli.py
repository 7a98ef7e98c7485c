"""`collegeadvisor kb build | ingest | query | recall`: the knowledge base from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", default=None, help="Chroma folder [default: kb_store]")
    p.add_argument("--url", default=None, help="Chroma server URL (http://host:8000), instead of a folder")
    p.add_argument("--collection", default="scorecard", help="[default: scorecard]")


def cmd_build(args) -> int:
    from collegeadvisor.kb import build_kb

    rows = None
    if args.limit:
        from collegeadvisor.data.scorecard import load_table

        rows = load_table().head(args.limit)
    stats = build_kb(args.path, args.url, rows=rows, batch_size=args.batch_size, collection=args.collection)
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def cmd_ingest(args) -> int:
    from collegeadvisor.kb import ingest_documents

    stats = ingest_documents([Path(f) for f in args.files], args.path, args.url, collection=args.collection)
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    return 0


def cmd_query(args) -> int:
    from collegeadvisor.kb import open_store, retriever

    hits = retriever(args.k, args.path, args.url, collection=open_store(args.path, args.url, args.collection))(
        args.question)
    for i, h in enumerate(hits, 1):
        print(f"[{i}] {h['id']}  distance={h['distance']:.3f}\n    {h['document']}")
    return 0


def cmd_recall(args) -> int:
    from collegeadvisor.eval.run import load_questions
    from collegeadvisor.kb import open_store, recall_at_k

    questions = load_questions(args.questions, args.limit)
    value = recall_at_k(questions, k=args.k, collection=open_store(args.path, args.url, args.collection))
    print(json.dumps({"questions": len(questions), "k": args.k, "recall": round(value, 4)}))
    return 0


def register(sub) -> None:
    """Add `kb` and its subcommands to the CLI's subparsers."""
    kb = sub.add_parser("kb", help="the ChromaDB knowledge base of College Scorecard facts").add_subparsers(
        dest="kb_command", required=True)
    p = kb.add_parser("build", help="embed every Scorecard row into the store (resumable: adds only what is missing)")
    _store_options(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of the table")
    p.add_argument("--batch-size", type=int, default=2048)
    p.set_defaults(func=cmd_build)
    p = kb.add_parser("ingest", help="add your own Markdown or text files as passages")
    _store_options(p)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_ingest)
    p = kb.add_parser("query", help="show what a question retrieves")
    _store_options(p)
    p.add_argument("question")
    p.add_argument("--k", type=int, default=5)
    p.set_defaults(func=cmd_query)
    p = kb.add_parser("recall", help="recall@k on a held-out question file")
    _store_options(p)
    p.add_argument("--questions", required=True, help="held-out JSONL (from collegeadvisor data scorecard)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=cmd_recall)
