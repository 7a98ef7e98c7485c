"""Advice quality on the held-out file for base, tuned and tuned+retrieval, against issue 4's goals.

    python bench/advice_quality.py --run latest [--kb-path kb_store] [--limit N]

Runs `collegeadvisor eval --compare --rag` (the same `evaluate`) and writes the `## Advice quality` section of
BENCHMARKS.md from its report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import write_section  # noqa: E402

from collegeadvisor.eval.run import evaluate  # noqa: E402
from collegeadvisor.kb import retriever  # noqa: E402
from collegeadvisor.runs import find_run, read_manifest  # noqa: E402

# metric -> (goal for tuned+rag, higher is better)
GOALS = {"numeric_accuracy": (0.90, True), "yes_no_accuracy": (0.95, True), "no_data_recall": (0.90, True),
         "empty_rate": (0.0, False)}
SHOWN = ["numeric_accuracy", "yes_no_accuracy", "no_data_recall", "empty_rate", "stopped_at_eos_rate", "rouge_l",
         "perplexity", "tokens_per_s"]


def fmt(name: str, value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if name.endswith(("accuracy", "recall", "rate", "rouge_l")) else f"{value:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="latest")
    ap.add_argument("--output-dir", default="runs")
    ap.add_argument("--questions", default=None)
    ap.add_argument("--kb-path", default="kb_store")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--section", default="Advice quality", help="BENCHMARKS.md section to (re)write")
    args = ap.parse_args()

    run = find_run(args.run, args.output_dir)
    hits_for = retriever(args.k, args.kb_path)
    report_json, report_html = evaluate(run, args.questions, args.out, compare=True, limit=args.limit,
                                        retriever=lambda q: [h["document"] for h in hits_for(q)])
    report = json.loads(Path(report_json).read_text())
    results = report["results"] if "results" in report else report["systems"]
    manifest = read_manifest(run)
    rows = ["| metric | " + " | ".join(results) + " | goal (tuned+rag) |",
            "| --- |" + " --- |" * (len(results) + 1)]
    for name in SHOWN:
        goal = GOALS.get(name)
        goal_txt = ""
        if goal:
            value = results.get("tuned+rag", {}).get(name)
            met = value is not None and (value >= goal[0] if goal[1] else value <= goal[0])
            goal_txt = f"{'>=' if goal[1] else '<='} {goal[0]:.0%} ({'met' if met else '**not met**'})"
        rows.append(f"| {name} | " + " | ".join(fmt(name, r.get(name)) for r in results.values()) + f" | {goal_txt} |")
    steps = manifest.get("schedule", {}).get("total_steps")
    body = "\n".join([
        f"Run `{run}` ({manifest['base_model']['spec']}, {steps} optimizer steps on "
        f"{manifest.get('data', {}).get('train', {}).get('kept', '?')} training examples), "
        f"{report['meta']['n_questions']} held-out questions about rows no training example uses, "
        f"retrieval k={args.k} from `{args.kb_path}`, greedy. Report: `{report_html}`.",
        "", *rows,
    ])
    write_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
