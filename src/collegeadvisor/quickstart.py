"""`collegeadvisor quickstart`: the whole job end to end on the embedded model, on a budget for 2 CPU cores.

Builds the Scorecard dataset (every example answered from retrieved rows, as RAFT builds them), trains, builds a
knowledge base for the evaluated questions (or uses the full one at kb_store), shows answers before and after
training through the retrieval path with the rows they used, and evaluates base and tuned models with retrieval
into a report (raw answers, and answers as served after the check)."""

from __future__ import annotations

import time
from pathlib import Path

from collegeadvisor.check import preflight
from collegeadvisor.config import load_config
from collegeadvisor.data.heldout import load_questions
from collegeadvisor.data.scorecard import load_table
from collegeadvisor.data.scorecard_qa import build_scorecard_dataset, dataset_is_current
from collegeadvisor.eval.run import adapter_state, evaluate
from collegeadvisor.generate import answer
from collegeadvisor.kb import build_kb, open_store, retriever
from collegeadvisor.runs import load_run
from collegeadvisor.train import train

SAMPLE_KINDS = ("earnings", "no_data", "premium", "open")
BASE_MAX_NEW_TOKENS = 64  # the untuned model rarely stops on its own: cap what it may spend


def quickstart_kb(questions: list[dict], kb_dir: Path, full_path: str = "kb_store"):
    """(store, its path): a knowledge base to retrieve from: the full one at `full_path` if `collegeadvisor kb build` made it, else
    (built once, in seconds) every row of the schools the questions name: the right row among its neighbours."""
    table = load_table()
    if Path(full_path).is_dir() and open_store(full_path).count() >= len(table):
        print(f"      using the full knowledge base at {full_path}")
        return open_store(full_path), str(full_path)
    schools = {str(r.get("unitid")) for q in questions
               for r in [q["source"], q["source"].get("compare_with") or {}, *(q["source"].get("rows") or [])]}
    rows = table[table["unitid"].astype(str).isin(schools)]
    stats = build_kb(kb_dir, rows=rows, progress=False)
    print(f"      {stats['count']} rows of {len(schools)} schools in {kb_dir} "
          "(collegeadvisor kb build makes the full 220,960-row one)")
    return open_store(kb_dir), str(kb_dir)


def _show(questions: list[dict], hits: list[list[dict]], before: list[dict], after: list[dict]) -> None:
    print("\n== before and after training, answering from the retrieved rows")
    for q, hs, b, a in zip(questions, hits, before, after):
        print(f"Q: {q['question']}")
        for i, h in enumerate(hs, 1):
            m = h.get("metadata") or {}
            print(f"   [{i}] {m.get('school')}: {m.get('credential')} in {m.get('program')}")
        for label, r in (("base ", b), ("tuned", a)):
            status = (r.get("raw_grounding") or {}).get("status", "-")
            end = "" if r["stopped"] else " [did not stop at end-of-turn]"
            print(f"   {label}: {r['raw'] or '(empty)'}{end}  <{status}>")
        print(f"   reference: {q['answer']}")


def quickstart(config: str | None = None, out: str | Path = "out/quickstart", eval_questions: int = 48) -> Path:
    t0 = time.time()
    out = Path(out)
    cfg = load_config(config, {})  # the run goes to output_dir (default runs/), where `--run latest` looks
    if not cfg.data:
        data_dir = out / "data"
        if not dataset_is_current(data_dir):  # none yet, or one an older builder wrote
            print(f"[1/4] building the College Scorecard dataset in {data_dir}")
            stats = build_scorecard_dataset(data_dir)
            print(f"      {stats['examples']} examples, {stats['heldout']} held-out questions: {stats['kinds']}")
        cfg.data = str(data_dir / "scorecard.jsonl")
    heldout = Path(cfg.data).with_name("heldout.jsonl")
    questions = load_questions(heldout)[:eval_questions]
    picked = [next(q for q in questions if q["kind"] == k) for k in SAMPLE_KINDS if any(q["kind"] == k for q in questions)]

    print("[2/4] training (preflight, then LoRA)")
    preflight(cfg)
    run = train(cfg)

    print("[3/4] knowledge base for the held-out questions")
    store, kb_path = quickstart_kb(questions, out / "kb")
    kb_flag = "" if kb_path == "kb_store" else f" --kb-path {kb_path}"  # the default store is kb_store
    model, tok, manifest = load_run(run)
    hits_for = retriever((manifest.get("retrieval") or {}).get("k") or 3, collection=store)
    hits = [hits_for(q["question"]) for q in picked]
    convs = [[{"role": "user", "content": q["question"]}] for q in picked]
    passages = [[h["document"] for h in hs] for hs in hits]
    with adapter_state(model, False):
        before = answer(model, tok, convs, passages, max_new_tokens=BASE_MAX_NEW_TOKENS, retries=0)
    with adapter_state(model, True):
        after = answer(model, tok, convs, passages, max_new_tokens=cfg.sample_max_new_tokens, retries=0)
    _show(picked, hits, before, after)
    del model

    print(f"\n[4/4] evaluating base and tuned, with retrieval, on {len(questions)} held-out questions")
    report_json, report_html = evaluate(run, heldout, compare=True, limit=len(questions), retriever=hits_for,
                                        max_new_tokens=cfg.sample_max_new_tokens,
                                        base_max_new_tokens=BASE_MAX_NEW_TOKENS)
    print(f"done in {time.time() - t0:.0f} s. Run: {run}\n      report: {report_html}\n      data: {report_json}")
    latest = "" if Path(cfg.output_dir) == Path("runs") else f" --output-dir {cfg.output_dir}"
    print(f"next: collegeadvisor chat --run latest{latest}{kb_flag} | eval --run latest{latest}{kb_flag} --compare | "
          f"serve --run latest{latest}{kb_flag} | export --run latest{latest} --to ollama --verify")
    return run
