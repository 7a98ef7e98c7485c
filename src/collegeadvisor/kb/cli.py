"""`collegeadvisor kb build | ingest | query | recall`: the knowledge base from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from collegeadvisor.config import KbConfig, add_command, as_line, as_yaml
from collegeadvisor.data.heldout import load_questions
from collegeadvisor.data.scorecard import load_table
from collegeadvisor.fsutil import atomic_write_text
from collegeadvisor.kb import DEFAULT_PATH, build_kb, ingest_documents, open_store, recall_at_k, retriever


def _report(s: KbConfig, stats: dict) -> int:
    """What a build or ingest did, on one line, then the settings it ran with: config.yaml inside the Chroma folder;
    logged for a Chroma server."""
    print(" ".join(f"{k}={v}" for k, v in stats.items()))
    if s.url:
        print(as_line(s), file=sys.stderr)
    else:
        print(f"settings: {atomic_write_text(Path(s.path or DEFAULT_PATH) / 'config.yaml', as_yaml(s))}")
    return 0


def cmd_build(args) -> int:
    s = KbConfig.from_args(args)
    rows = None
    if s.limit:
        rows = load_table().head(s.limit)
    return _report(s, build_kb(s.path, s.url, rows=rows, batch_size=s.batch_size, collection=s.collection))


def cmd_ingest(args) -> int:
    s = KbConfig.from_args(args)
    return _report(s, ingest_documents([Path(f) for f in args.files], s.path, s.url, collection=s.collection))


def cmd_query(args) -> int:
    s = KbConfig.from_args(args)
    hits = retriever(s.k, s.path, s.url, collection=open_store(s.path, s.url, s.collection))(args.question)
    for i, h in enumerate(hits, 1):
        print(f"[{i}] {h['id']}  distance={h['distance']:.3f}\n    {h['document']}")
    return 0


def cmd_recall(args) -> int:
    s = KbConfig.from_args(args)
    questions = load_questions(args.questions, args.question_limit)
    value = recall_at_k(questions, k=s.k, collection=open_store(s.path, s.url, s.collection))
    print(json.dumps({"questions": len(questions), "k": s.k, "recall": round(value, 4)}))
    return 0


STORE = ("path", "url", "collection")


def register(sub) -> None:
    """Add `kb` and its subcommands to the CLI's subparsers; their settings are the `kb:` section's."""
    kb = sub.add_parser("kb", help="the ChromaDB knowledge base of College Scorecard facts").add_subparsers(
        dest="kb_command", required=True)
    add_command(kb, "build", "embed every Scorecard row into the store (resumable: adds only what is missing)",
                KbConfig, cmd_build, only=STORE + ("limit", "batch_size"))
    p = add_command(kb, "ingest", "add your own Markdown or text files as passages", KbConfig, cmd_ingest, only=STORE)
    p.add_argument("files", nargs="+")
    p = add_command(kb, "query", "show what a question retrieves", KbConfig, cmd_query, only=STORE + ("k",))
    p.add_argument("question")
    p = add_command(kb, "recall", "recall@k on a held-out question file", KbConfig, cmd_recall, only=STORE + ("k",))
    p.add_argument("--questions", required=True, help="held-out JSONL (from collegeadvisor data scorecard)")
    p.add_argument("--limit", dest="question_limit", type=int, default=None, help="only the first N questions")
