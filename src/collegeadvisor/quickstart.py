"""`collegeadvisor quickstart`: the whole job end to end on the embedded model, on a budget for 2 CPU cores.

Builds the Scorecard dataset, answers held-out questions with the base model, trains, answers them again with
the tuned model, and evaluates base vs tuned into a report."""

from __future__ import annotations

import time
from pathlib import Path

from collegeadvisor.config import load_config
from collegeadvisor.eval.run import evaluate, load_questions
from collegeadvisor.generate import generate
from collegeadvisor.runs import load_run

SAMPLE_KINDS = ("earnings", "no_data", "premium")


def _show(title: str, questions: list[dict], replies: list[dict]) -> None:
    print(f"\n== {title}")
    for q, r in zip(questions, replies):
        end = "" if r["stopped"] else "  [did not stop at end-of-turn]"
        print(f"Q: {q['question']}\nA: {r['text'] or '(empty)'}{end}\n   reference: {q['answer']}")


def quickstart(config: str | None = None, out: str | Path = "out/quickstart", eval_questions: int = 48) -> Path:
    from collegeadvisor.data.scorecard import build_scorecard_dataset
    from collegeadvisor.train import train

    t0 = time.time()
    out = Path(out)
    cfg = load_config(config, {"output_dir": str(out / "runs")})
    if not cfg.data:
        data_dir = out / "data"
        if not (data_dir / "scorecard.jsonl").is_file():
            print(f"[1/4] building the College Scorecard dataset in {data_dir}")
            stats = build_scorecard_dataset(data_dir)
            print(f"      {stats['examples']} examples, {stats['heldout']} held-out questions: {stats['kinds']}")
        cfg.data = str(data_dir / "scorecard.jsonl")
    heldout = Path(cfg.data).with_name("heldout.jsonl")
    questions = load_questions(heldout)
    picked = [next(q for q in questions if q["kind"] == k) for k in SAMPLE_KINDS]

    print("[2/4] training (preflight, then LoRA)")
    run = train(cfg)
    model, tok, manifest = load_run(run)
    convs = [[{"role": "user", "content": q["question"]}] for q in picked]
    with model.disable_adapter():
        before = generate(model, tok, convs, max_new_tokens=cfg.sample_max_new_tokens)
    after = generate(model, tok, convs, max_new_tokens=cfg.sample_max_new_tokens)
    _show("before training (base model)", picked, before)
    _show("after training (tuned)", picked, after)
    del model

    print(f"\n[3/4] evaluating base vs tuned on {eval_questions} held-out questions")
    report_json, report_html = evaluate(run, heldout, compare=True, limit=eval_questions)
    print(f"[4/4] done in {time.time() - t0:.0f} s. Run: {run}\n      report: {report_html}\n      data: {report_json}")
    return run
