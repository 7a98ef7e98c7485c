"""Advice quality on the held-out file, through retrieval, against issue 13's goals; and what the grounding
constraint costs in generation tokens/s.

    python bench/advice_quality.py --run latest --kb-path kb_store [--limit N] [--section TITLE] [--compare]

Runs the same `evaluate` as `collegeadvisor eval`: the tuned model's raw answers (under the constraint, before any
retry or fallback) and its answers as served (after the check and its retries), scored against the rows. Then
times greedy generation of the same prompts with and without the constraint. Writes one section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import write_section  # noqa: E402

from collegeadvisor.data.heldout import load_questions  # noqa: E402
from collegeadvisor.eval.run import evaluate  # noqa: E402
from collegeadvisor.generate import generate  # noqa: E402
from collegeadvisor.kb import retriever  # noqa: E402
from collegeadvisor.runs import find_run, load_run, read_manifest  # noqa: E402

# metric -> (goal for the tuned model's raw answers with retrieval, higher is better)
GOALS = {"numeric_accuracy": (0.90, True), "yes_no_accuracy": (0.90, True), "no_data_recall": (0.90, True),
         "outside_context_rate": (0.0, False), "empty_rate": (0.0, False)}
SHOWN = ["numeric_accuracy", "yes_no_accuracy", "no_data_recall", "outside_context_rate", "grounded_rate",
         "empty_rate", "stopped_at_eos_rate", "rouge_l", "tokens_per_s"]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
        return f"{name} ({'AMX' if amx else 'no AMX'})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def fmt(name: str, value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if name.endswith(("accuracy", "recall", "rate", "rouge_l")) else f"{value:.2f}"


def constraint_cost(run, questions, hits_for, n: int = 16, max_new_tokens: int = 96) -> dict:
    """Generated tokens/s of the same prompts, greedy, with and without the grounding constraint (alternated)."""
    model, tok, _ = load_run(run, merge=True)
    qs = questions[:n]
    convs = [[{"role": "user", "content": q["question"]}] for q in qs]
    passages = [[h["document"] for h in hits_for(q["question"])] for q in qs]
    speed = {True: [], False: []}
    for grounded in (False, True, False, True):
        t = time.perf_counter()
        out = generate(model, tok, convs, max_new_tokens=max_new_tokens, passages=passages, grounded=grounded)
        speed[grounded].append(sum(r["n_tokens"] for r in out) / (time.perf_counter() - t))
    free, held = max(speed[False]), max(speed[True])
    return {"free": free, "grounded": held, "cost": 1 - held / free, "n": len(qs)}


def table(results: dict) -> list[str]:
    rows = ["| metric | " + " | ".join(results) + " | goal (tuned+rag, raw) |",
            "| --- |" + " --- |" * (len(results) + 1)]
    for name in SHOWN:
        goal, goal_txt = GOALS.get(name), ""
        if goal:
            value = results.get("tuned+rag", {}).get(name)
            met = value is not None and (value >= goal[0] if goal[1] else value <= goal[0])
            goal_txt = f"{'>=' if goal[1] else '<='} {goal[0]:.0%} ({'met' if met else '**not met**'})"
        rows.append(f"| {name} | " + " | ".join(fmt(name, r.get(name)) for r in results.values()) + f" | {goal_txt} |")
    return rows


def attribution(results: dict) -> list[str]:
    rows = ["| wrong answers by cause | " + " | ".join(results) + " |", "| --- |" + " --- |" * len(results)]
    for cause in ("retrieval_miss", "reading_error", "abstention_error"):
        rows.append(f"| {cause} | " + " | ".join(str((r.get("attribution") or {}).get(cause, "n/a"))
                                                for r in results.values()) + " |")
    return rows


def contradicted(samples: list[dict]) -> float:
    """Share of served answers with a figure or yes/no that their cited row contradicts."""
    return sum(1 for s in samples if s.get("grounding") == "unverified") / max(len(samples), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="latest")
    ap.add_argument("--output-dir", default="runs")
    ap.add_argument("--questions", default=None)
    ap.add_argument("--kb-path", default="kb_store")
    ap.add_argument("--k", type=int, default=None, help="default: the run's")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--compare", action="store_true", help="also the base model")
    ap.add_argument("--out", default=None)
    ap.add_argument("--section", default="Advice quality", help="BENCHMARKS.md section to (re)write")
    args = ap.parse_args()

    run = find_run(args.run, args.output_dir)
    manifest = read_manifest(run)
    k = args.k or (manifest.get("retrieval") or {}).get("k") or 3
    hits_for = retriever(k, args.kb_path)
    t0 = time.perf_counter()
    report_json, report_html = evaluate(run, args.questions, args.out, compare=args.compare, limit=args.limit,
                                        retriever=hits_for, base_max_new_tokens=64)
    eval_s = time.perf_counter() - t0
    report = json.loads(Path(report_json).read_text())
    results = report["results"]
    questions = load_questions(report["meta"]["questions"], args.limit)
    cost = constraint_cost(run, questions, hits_for)
    served = report["samples"].get("tuned+rag (served)", [])
    steps = manifest.get("schedule", {}).get("total_steps")
    body = "\n".join([
        f"CPU: {cpu_name()}. Run `{run}` ({manifest['base_model']['spec']}, {steps} optimizer steps on "
        f"{manifest.get('data', {}).get('train', {}).get('kept', '?')} training examples), "
        f"{report['meta']['n_questions']} held-out questions about rows no training example uses (all kinds), "
        f"retrieval k={k} from `{args.kb_path}`, greedy; eval took {eval_s:.0f} s. `tuned+rag` is the model's raw "
        "answer under the grounding constraint, before any retry or fallback; `(served)` is after the check and its "
        f"retries. Report: `{report_html}`.",
        "", *table(results), "",
        f"As served, answers whose figure or yes/no their cited row contradicts: "
        f"{contradicted(served):.1%} (goal 0%).", "",
        *attribution(results), "",
        f"The constraint's cost, same {cost['n']} prompts, greedy, best of two each: {cost['free']:.1f} tokens/s "
        f"without, {cost['grounded']:.1f} with: {cost['cost']:+.1%} (goal: at most 10%).",
    ])
    write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
