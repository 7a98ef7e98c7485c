"""`collegeadvisor quickstart`: the whole job end to end on the embedded model, on a budget for 2 CPU cores.

Builds the Scorecard dataset (part of it grounded in retrieved passages), trains, shows answers before and after
training, builds a knowledge base for the evaluated questions (or uses the full one at kb_store), and evaluates
base, tuned and tuned+retrieval into a report."""

from __future__ import annotations

import time
from pathlib import Path

from collegeadvisor.check import preflight
from collegeadvisor.config import load_config
from collegeadvisor.data.scorecard import MAX_PASSAGES
from collegeadvisor.eval.run import evaluate, load_questions
from collegeadvisor.generate import generate
from collegeadvisor.runs import load_run

SAMPLE_KINDS = ("earnings", "no_data", "premium")
RAG_FRACTION = 0.3  # share of training examples answered from retrieved passages
RAG_K = MAX_PASSAGES  # passages retrieved per question, as many as training contexts hold


def quickstart_kb(questions: list[dict], kb_dir: Path, full_path: str = "kb_store"):
    """A knowledge base to retrieve from: the full one at `full_path` if `collegeadvisor kb build` made it, else
    (built once, in seconds) every row of the schools the questions name: the right row among its neighbours."""
    from collegeadvisor.data.scorecard import load_table
    from collegeadvisor.kb import build_kb, open_store

    table = load_table()
    if Path(full_path).is_dir() and open_store(full_path).count() >= len(table):
        print(f"      using the full knowledge base at {full_path}")
        return open_store(full_path)
    schools = {str(r.get("unitid")) for q in questions
               for r in [q["source"], q["source"].get("compare_with") or {}, *(q["source"].get("rows") or [])]}
    rows = table[table["unitid"].astype(str).isin(schools)]
    stats = build_kb(kb_dir, rows=rows, progress=False)
    print(f"      {stats['count']} rows of {len(schools)} schools in {kb_dir} "
          "(collegeadvisor kb build makes the full 220,960-row one)")
    return open_store(kb_dir)


def _show(title: str, questions: list[dict], replies: list[dict]) -> None:
    print(f"\n== {title}")
    for q, r in zip(questions, replies):
        end = "" if r["stopped"] else "  [did not stop at end-of-turn]"
        print(f"Q: {q['question']}\nA: {r['text'] or '(empty)'}{end}\n   reference: {q['answer']}")


def quickstart(config: str | None = None, out: str | Path = "out/quickstart", eval_questions: int = 24) -> Path:
    from collegeadvisor.data.scorecard import build_scorecard_dataset
    from collegeadvisor.train import train

    t0 = time.time()
    out = Path(out)
    cfg = load_config(config, {})  # the run goes to output_dir (default runs/), where `--run latest` looks
    if not cfg.data:
        data_dir = out / "data"
        if not (data_dir / "scorecard.jsonl").is_file():
            print(f"[1/4] building the College Scorecard dataset in {data_dir}")
            stats = build_scorecard_dataset(data_dir, rag_fraction=RAG_FRACTION)
            print(f"      {stats['examples']} examples, {stats['heldout']} held-out questions: {stats['kinds']}")
        cfg.data = str(data_dir / "scorecard.jsonl")
    heldout = Path(cfg.data).with_name("heldout.jsonl")
    questions = load_questions(heldout)
    picked = [next(q for q in questions if q["kind"] == k) for k in SAMPLE_KINDS]

    print("[2/4] training (preflight, then LoRA)")
    preflight(cfg)
    run = train(cfg)
    model, tok, manifest = load_run(run)
    convs = [[{"role": "user", "content": q["question"]}] for q in picked]
    with model.disable_adapter():
        before = generate(model, tok, convs, max_new_tokens=cfg.sample_max_new_tokens)
    after = generate(model, tok, convs, max_new_tokens=cfg.sample_max_new_tokens)
    _show("before training (base model)", picked, before)
    _show("after training (tuned)", picked, after)
    del model

    from collegeadvisor.kb import retriever

    print(f"\n[3/4] evaluating base, tuned and tuned+retrieval on {eval_questions} held-out questions")
    hits_for = retriever(RAG_K, collection=quickstart_kb(questions[:eval_questions], out / "kb"))
    report_json, report_html = evaluate(run, heldout, compare=True, limit=eval_questions,
                                        retriever=lambda q: [h["document"] for h in hits_for(q)])
    print(f"[4/4] done in {time.time() - t0:.0f} s. Run: {run}\n      report: {report_html}\n      data: {report_json}")
    latest = "" if Path(cfg.output_dir) == Path("runs") else f" --output-dir {cfg.output_dir}"
    print(f"next: collegeadvisor chat --run latest{latest} | eval --run latest{latest} --compare | "
          f"serve --run latest{latest} | export --run latest{latest} --to ollama --verify")
    return run
