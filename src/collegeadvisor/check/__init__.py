"""`collegeadvisor check`: the preflight. Each check is a small function returning findings; nothing is fixed
silently.

A finding is an error (training refuses to start unless --force), a warning or an info line, and names the
example's `file:line` or the setting, plus what to do. The checks, one module each:

- format: every example renders through the model's own template; each generation prompt is an exact token prefix
  of the training ids; the end-of-turn token ends each assistant turn and is labelled; no foreign scaffolding
  (`<|endoftext|>`, `</s>`, `### Response:`, ...) inside the data; no prompt token with a label;
- data: the examples train picks; the share of labelled tokens; a token-length histogram per split, answers cut at
  max_length, the max_length covering 99%;
- setup: train's own plan (train.plan: steps, epochs, rows kept, precision) and the config: epochs, learning rate,
  LoRA rank, pad == EOS, fp16 on CPU/MPS, gradient clipping;
- runs: a run directory that does not match the config, or did not complete;
- retrieval: the knowledge base a run trained on retrieved rows (or --kb-path / --kb-url) reads from: there, full,
  built with the run's embedding model and row format;
- environment: packages (chromadb imported for real, in a subprocess), disk, memory (the plan's estimate), and an
  ETA (the plan's tokens at the speed of a short measured step).

Rows are encoded by chat_format exactly as `train` encodes them; the examples checked are the ones `train` picks,
and what train will do with them is the plan train itself runs (train.planner), never worked out again here.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from collegeadvisor.chat_format import end_of_turn_token
from collegeadvisor.check.data import check_label_share, check_length, select_examples
from collegeadvisor.check.environment import (
    DEFAULT_STAGES,
    STAGE_PACKAGES,
    check_disk,
    check_eta,
    check_memory,
    check_packages,
    check_report_to,
    measure_step,
    memory,
)
from collegeadvisor.check.findings import Finding, errors, finding, group, ordered, plural, print_findings, summary
from collegeadvisor.check.format import check_scaffolding, encode_split, example_findings
from collegeadvisor.check.retrieval import check_chromadb, check_kb, check_retrieval
from collegeadvisor.check.runs import check_output_dir, check_run
from collegeadvisor.check.setup import check_padding, check_plan, check_precision, check_setup, resolve_device
from collegeadvisor.config import Config, add_command
from collegeadvisor.errors import AdvisorError, ModelError, TemplateError
from collegeadvisor.models import load_tokenizer, resolve_base_model

__all__ = ["DEFAULT_STAGES", "Finding", "check_chromadb", "check_kb", "errors", "example_findings", "memory",
           "preflight", "print_findings", "register", "run_checks", "summary"]


def run_checks(cfg, run: str | Path | None = None, measure: bool = True,
               stages: Sequence[str] = DEFAULT_STAGES, kb_path: str | None = None,
               kb_url: str | None = None) -> list[Finding]:
    """Every check on a config, its data (as train would pick and encode it), train's plan for them, optionally a
    run directory and the knowledge base it (or kb_path / kb_url) reads from. A base model that cannot be resolved
    raises its ModelError: there is nothing to check without a tokenizer."""
    from collegeadvisor.train.planner import model_shape  # the train package imports torch: only when checks run

    findings = check_packages(stages)
    if any(f.data.get("stage") == "train" for f in findings):
        return ordered(findings)  # nothing below runs without torch, transformers and peft
    findings += check_report_to(cfg)
    if "kb" in stages and not any(f.where == "chromadb" for f in findings):
        findings += check_chromadb()
    findings += check_retrieval(run, kb_path, kb_url, findings)
    device, missing = resolve_device(cfg)
    findings += missing + check_output_dir(cfg) + check_precision(cfg, device)

    resolved = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(resolved)
    try:
        shape = model_shape(resolved, cfg)
    except Exception as exc:  # an architecture transformers cannot build from its config alone
        shape = None
        findings.append(finding("warning", "setup", "base_model", f"cannot size the model ({type(exc).__name__}: "
                                f"{exc})".splitlines()[0], "the RAM and disk estimates are skipped", "no-shape"))
    if run is not None:
        findings += check_run(cfg, run, tokenizer, resolved)
    try:
        eot = end_of_turn_token(tokenizer)
    except TemplateError as exc:
        findings.append(finding("error", "format", "base_model", f"{cfg.base_model}: {exc}",
                                "use a chat model whose template ends replies with a special token", "template"))
        return ordered(findings)
    found, rows = check_data(cfg, tokenizer, eot, shape)
    findings += found
    findings += check_training(cfg, rows, None if missing else device, tokenizer, resolved, shape, measure)
    return ordered(findings)


def check_data(cfg, tokenizer, eot: str, shape: dict | None):
    """(findings, rows): format, masking and length checks of the examples train picks, and the rows train keeps of
    them (train.planner.encode)."""
    from collegeadvisor.train.planner import Rows, encode  # torch: see run_checks

    if not cfg.data:
        return [finding("error", "setup", "data", "no training data given", "pass --data FILE (or build one with "
                        "`collegeadvisor data scorecard`)", "no-data")], Rows([], [])
    splits, everything, findings = select_examples(cfg)
    findings += check_scaffolding(tokenizer, everything)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    full: dict[str, list[dict]] = {}
    per_example: list[Finding] = []
    for name, (path, examples) in splits.items():
        full[name], found = encode_split(tokenizer, path, examples, eot_id)
        per_example += found
    findings += group(per_example)
    findings += check_label_share(full)
    findings += check_length(cfg, full, shape and shape["max_positions"])
    if not full.get("train") and not errors(findings):
        findings.append(finding("error", "format", cfg.data, "no usable training example", "check the data", "empty"))
    rendered = {name: [r["example"] for r in rows] for name, rows in full.items()}  # train stops on the others
    return findings, encode(cfg, tokenizer, rendered["train"], rendered["val"], refuse=False)


def check_training(cfg, rows, device: str | None, tokenizer, resolved: str, shape: dict | None,
                   measure: bool) -> list[Finding]:
    """Setup checks on train's schedule, and on a device this machine has: train's plan, its memory against the
    machine's, disk, and the ETA at a measured step's speed."""
    from collegeadvisor.train.planner import plan, schedule  # torch: see run_checks

    findings = check_setup(cfg, schedule(cfg, rows), shape)
    if rows.train:
        findings += check_padding(cfg, tokenizer, rows.train)
    p = None
    if device is not None:  # on a device this machine lacks there is nothing to plan, measure or size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = plan(cfg, rows, device, shape=shape)
        except ModelError as exc:
            findings.append(finding("error", "setup", "dtype", str(exc), "choose auto, fp32, bf16 or fp16",
                                    "bad-dtype"))
    if p is not None:
        findings += check_plan(p)
    if shape is not None:
        if p is not None:
            findings += check_memory(p.device, p.memory)
        findings += check_disk(cfg, shape, resolved)
        if measure and p is not None and rows.train:
            findings += check_eta(cfg, measure_step(cfg, resolved, tokenizer, rows.train, p), p)
    return findings


def preflight(cfg, force: bool = False, run: str | Path | None = None, measure: bool = True,
              stages: Sequence[str] = DEFAULT_STAGES) -> list[Finding]:
    """run_checks + print_findings; errors stop here (one line) unless force. Under torchrun / accelerate launch
    every rank checks (and stops alike), only rank 0 times a step and prints."""
    main = int(os.environ.get("RANK", "0")) == 0
    findings = run_checks(cfg, run=run, measure=measure and main, stages=stages)
    if main:
        print_findings(findings)
    if errors(findings):
        if not force:
            raise AdvisorError(summary(findings))
        if main:
            print(f"--force: training despite {plural(len(errors(findings)), 'preflight error')}", file=sys.stderr)
    return findings


# ---------------------------------------------------------------------------------------------- CLI
def cmd_check(args) -> int:
    cfg = Config.from_args(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_PACKAGES]
    if unknown:
        raise AdvisorError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGE_PACKAGES)}")
    findings = run_checks(cfg, run=args.run, measure=args.measure, stages=stages, kb_path=args.kb_path,
                          kb_url=args.kb_url)
    print_findings(findings)
    if errors(findings):
        raise AdvisorError(summary(findings, force_hint=False))
    return 0


def register(sub) -> None:
    """Add `check` (the same settings as train, plus --run) to the CLI's subparsers."""
    p = add_command(sub, "check", "preflight: check the config, data (and a run) before training; exit 1 on errors",
                    Config, cmd_check)
    p.add_argument("--run", default=None, help="a run directory to inspect and compare with the config (and, when "
                   "it was trained on retrieved rows, the knowledge base)")
    p.add_argument("--kb-path", default=None, help="a knowledge base folder to check (default for a retrieval run: "
                   "kb_store)")
    p.add_argument("--kb-url", default=None, help="a Chroma server URL to check instead of a folder")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"stages whose packages must be installed ({', '.join(STAGE_PACKAGES)}) "
                        f"[default: {','.join(DEFAULT_STAGES)}]")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="time one training step for the ETA [default: on]")
