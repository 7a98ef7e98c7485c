"""The conversation set answered by a run's model ALONE, several runs side by side in one process.

No resolution, no fixed reply, no standalone question: the way an exported model behind plain retrieval meets users
(llama.cpp or Ollama with a retrieval front end). Each turn retrieves by its own message (k rows from the knowledge
base); the whole conversation so far, with the model's own earlier answers, is rendered with those rows through
chat_format and generated under the figure constraint. The first answer is kept (no retry, no fallback) and the
last turn's is scored as `bench/conversations.py` scores served answers. Every run reads the same retrieved rows.

    python bench/talk_alone.py --runs RUN_A RUN_B [--conversations bench/conversations.jsonl] [--kb-path kb_store]
                               [--limit N] [--out FILE.json]

It measures what the dataset's conversational examples (data.scorecard_talk) buy a model used without advise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conversations as cv  # noqa: E402  (bench/conversations.py: the set, its scoring and its table)
from _bench import cpu_name  # noqa: E402

from collegeadvisor.generate import answer  # noqa: E402
from collegeadvisor.kb import open_store, retriever  # noqa: E402
from collegeadvisor.runs import load_run  # noqa: E402
from collegeadvisor.serve.app import grounded_fields  # noqa: E402


def alone(run: str, convs: list[dict], hits_for, max_new_tokens: int = 160) -> list[dict]:
    """Each conversation turn by turn, all conversations' turn t in one batch; the last answer scored."""
    model, tok, _ = load_run(run)
    history: list[list[dict]] = [[] for _ in convs]
    last: list[tuple[str, dict]] = [("", {}) for _ in convs]
    for t in range(max(len(c["turns"]) for c in convs)):
        todo = [i for i, c in enumerate(convs) if t < len(c["turns"])]
        for i in todo:
            history[i].append({"role": "user", "content": convs[i]["turns"][t]})
        hits = {i: hits_for(convs[i]["turns"][t]) for i in todo}
        out = answer(model, tok, [history[i] for i in todo], [[h["document"] for h in hits[i]] for i in todo],
                     max_new_tokens=max_new_tokens, retries=0)
        for i, r in zip(todo, out):
            history[i].append({"role": "assistant", "content": r["raw"]})
            last[i] = (r["raw"], grounded_fields(hits[i], r["raw_grounding"]))
    results = []
    for conv, (text, extras) in zip(convs, last):
        results.append({"id": conv["id"], "kind": conv["kind"], "turns": conv["turns"], "answer": text,
                        "grounding": extras["grounding"]["status"], "score": cv.score(conv, text, extras)})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--conversations", default=str(cv.DEFAULT_SET))
    ap.add_argument("--kb-path", default="kb_store")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="only the first N conversations of each kind")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    convs = cv._limit(cv.load(a.conversations), a.limit)
    hits_for = retriever(a.k, collection=open_store(a.kb_path))
    report = {"cpu": cpu_name(), "conversations": a.conversations, "n": len(convs), "runs": {}}
    for run in a.runs:
        t0 = time.perf_counter()
        results = alone(run, convs, hits_for)
        summary = cv.summarize(results)
        report["runs"][run] = {"seconds": round(time.perf_counter() - t0, 1), "summary": summary,
                               "verified": sum(r["grounding"] == "verified" for r in results),
                               "results": results}
        print(f"\n## {run} (model alone, {len(convs)} conversations, {time.perf_counter() - t0:.0f} s)")
        print(cv.table_md(summary))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
