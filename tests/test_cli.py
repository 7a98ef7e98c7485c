"""The CLI on top: one way to register commands, no module below it importing it, settings from the command line
(none unsets, a bad value is one line), the shared run options."""

import ast
import argparse
import os
import sys
from pathlib import Path

import pytest

import collegeadvisor
from collegeadvisor.cli import build_parser, main
from collegeadvisor.config import (MAX_NEW_TOKENS, ChatConfig, Config, EvalConfig, ExportConfig, KbConfig, ServeConfig,
                                   add_command)
from collegeadvisor.errors import AdvisorError

SRC = Path(collegeadvisor.__file__).parent
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_no_module_below_the_cli_imports_it():
    importers = [p.relative_to(SRC) for p in SRC.rglob("*.py")
                 if p.name != "cli.py" or p.parent != SRC
                 if "collegeadvisor.cli" in imported_modules(p)]
    assert importers == []
    assert "importlib" not in imported_modules(SRC / "cli.py")  # commands are registered one way: register(sub)


def test_every_command_is_registered():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["train", "data", "quickstart", "eval", "chat", "check", "kb", "serve", "export"]
    data = next(a for a in sub.choices["data"]._actions if isinstance(a, argparse._SubParsersAction))
    assert list(data.choices) == ["scorecard", "validate", "preview"]


def test_every_command_prints_its_help(capsys):
    """--help formats every option's text (a bare '%' in one crashed `train --help` with a traceback)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = [[name] for name in sub.choices if name not in ("data", "kb")]
    for group in ("data", "kb"):
        nested = next(a for a in sub.choices[group]._actions if isinstance(a, argparse._SubParsersAction))
        commands += [[group, name] for name in nested.choices]
    for argv in commands:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([*argv, "--help"])
        assert done.value.code == 0, argv
        assert capsys.readouterr().out.startswith("usage:"), argv
    assert len(commands) >= 12


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_none_unsets_a_setting_that_may_be_unset():
    cfg = Config.from_args(parse("--config", str(QUICKSTART), "--max-steps", "none", "--max-grad-norm", "null",
                                 "--report-to", "none", "--lora-r", "8"))
    assert cfg.max_steps is None and cfg.max_grad_norm is None and cfg.report_to is None and cfg.lora_r == 8
    import yaml

    assert Config.from_args(parse("--config", str(QUICKSTART))).max_steps == yaml.safe_load(QUICKSTART.read_text())[
        "max_steps"]
    assert Config.from_args(parse("--report-to", "tensorboard")).report_to == "tensorboard"


@pytest.mark.parametrize("argv, message", [
    (["--max-length", "none"], "--max-length none: this setting cannot be unset [default: 512]"),
    (["--max-length", "abc"], "--max-length abc: Input should be a valid integer"),
    (["--epochs", "-1"], "--epochs -1: Input should be greater than 0"),
    (["--max-steps", "0"], "--max-steps 0: Input should be greater than or equal to 1"),
])
def test_none_and_bad_values_are_one_line(argv, message, capsys):
    with pytest.raises(AdvisorError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        Config.from_args(parse(*argv))
    assert main(["train", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1 and "internal error" not in err


def test_run_options_keep_their_names_and_defaults():
    """The options of the commands that use a run, resolved through their settings (flags, section, defaults)."""
    def settings(*argv):
        args = build_parser().parse_args(list(argv))
        return {"chat": ChatConfig, "eval": EvalConfig, "serve": ServeConfig, "export": ExportConfig}[argv[0]].from_args(
            args)

    s = settings("chat")
    assert (s.run, s.output_dir, s.device, s.max_new_tokens) == ("latest", "runs", "auto", 256)
    assert (s.rag, s.k, s.kb_path, s.kb_url) == (None, None, None, None)
    s = settings("eval", "--no-rag", "--k", "5", "--kb-url", "http://x")
    assert (s.rag, s.k, s.kb_url, s.max_new_tokens) == (False, 5, "http://x", 256)
    s = settings("serve", "--rag", "--kb-path", "kb")
    assert (s.rag, s.kb_path, s.run, s.max_new_tokens) == (True, "kb", "latest", 256)
    s = settings("export", "--to", "merged")
    assert (s.run, s.output_dir, s.device) == ("latest", "runs", "cpu")
    assert not hasattr(s, "rag") and not hasattr(build_parser().parse_args(["export"]), "rag")


def test_one_generation_budget_by_default():
    """eval, chat and serve, and the functions they call, default to config.MAX_NEW_TOKENS per answer (eval's was 128
    while the others' was 256); --help says so."""
    import inspect

    from collegeadvisor.chat import chat_loop
    from collegeadvisor.eval.run import evaluate
    from collegeadvisor.generate import answer, generate
    from collegeadvisor.serve.app import create_app

    assert MAX_NEW_TOKENS == 256
    assert [c().max_new_tokens for c in (EvalConfig, ChatConfig, ServeConfig)] == [MAX_NEW_TOKENS] * 3
    for fn, name in ((generate, "max_new_tokens"), (answer, "max_new_tokens"), (chat_loop, "max_new_tokens"),
                     (evaluate, "max_new_tokens"), (create_app, "default_max_tokens")):
        assert inspect.signature(fn).parameters[name].default == MAX_NEW_TOKENS, fn.__qualname__
    for command in ("eval", "chat", "serve"):
        text = " ".join(subparser(command).format_help().split())
        assert f"most tokens generated per answer [default: {MAX_NEW_TOKENS}]" in text, command


def subparser(*names) -> argparse.ArgumentParser:
    p = build_parser()
    for name in names:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return p


def test_add_command_registers_a_settings_command():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    run = lambda args: 0  # noqa: E731
    p = add_command(sub, "find", "look something up", KbConfig, run, only=("path", "k"))
    p.add_argument("question")
    args = parser.parse_args(["find", "--config", "x.yaml", "--k", "4", "what?"])
    assert (args.func, args.config, args.k, args.question, args.path) == (run, "x.yaml", "4", "what?", None)
    assert not hasattr(args, "url") and sub.choices["find"] is p
    assert sub._choices_actions[0].help == "look something up"
    train = add_command(sub, "t", "train", Config, run)
    assert {"--config", "--max-length", "--lora-r"} <= set(train._option_string_actions)


def test_settings_commands_are_registered_one_way():
    """A command whose options are a settings class is added by config.add_command (subparser, --config and the
    settings' options, func), not by writing those lines again in each module."""
    written_again = []
    for path in SRC.rglob("*.py"):
        if path.relative_to(SRC).as_posix() in ("config.py", "data/preview.py"):  # preview: not converted yet
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_arguments"):
                written_again.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert written_again == []
    for argv in (["train"], ["eval"], ["chat"], ["check"], ["serve"], ["export"], ["kb", "build"], ["kb", "ingest"],
                 ["kb", "query"], ["kb", "recall"]):
        assert "--config" in subparser(*argv)._option_string_actions, argv


def test_kb_build_and_ingest_report_alike(tmp_path, capsys):
    """build and ingest end the same way: their stats on one line, then the settings they ran with (config.yaml in
    the folder, or one line on stderr for a Chroma server)."""
    from collegeadvisor.kb.cli import _report

    s = KbConfig(path=str(tmp_path / "kb"))
    assert _report(s, {"count": 3, "added": 1}) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["count=3 added=1", f"settings: {tmp_path / 'kb' / 'config.yaml'}"]
    assert (tmp_path / "kb" / "config.yaml").read_text().startswith("# collegeadvisor kb:")
    assert _report(KbConfig(url="http://chroma:8000"), {"count": 3}) == 0
    captured = capsys.readouterr()
    assert captured.out == "count=3\n" and captured.err.startswith("settings: {kb: {path: null, url: 'http://chroma:8000'")


def test_training_commands_run_again_under_jemalloc_where_it_is_installed(tmp_path, monkeypatch):
    """`train` and `quickstart` re-run themselves with jemalloc preloaded (flat memory over a long run), unless it is
    already preloaded, turned off, not installed, or the command is another one."""
    from collegeadvisor import cli

    lib = tmp_path / cli.JEMALLOC
    lib.write_bytes(b"")
    calls = []

    def execve(path, argv, env):
        calls.append((argv, env["LD_PRELOAD"]))

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(cli.JEMALLOC_OFF, raising=False)
    argv = ["train", "--config", "configs/quickstart.yaml"]
    assert cli.under_jemalloc("train", argv, dirs=(str(tmp_path),), execve=execve) == str(lib)
    assert calls == [([sys.executable, "-m", "collegeadvisor.cli", *argv], str(lib))]
    assert cli.under_jemalloc("serve", argv, dirs=(str(tmp_path),), execve=execve) is None
    assert cli.under_jemalloc("train", argv, dirs=(str(tmp_path / "none"),), execve=execve) is None
    monkeypatch.setenv(cli.JEMALLOC_OFF, "0")
    assert cli.under_jemalloc("quickstart", argv, dirs=(str(tmp_path),), execve=execve) is None
    monkeypatch.delenv(cli.JEMALLOC_OFF)
    monkeypatch.setenv("LD_PRELOAD", str(lib))  # the run again: it says what it runs under, and runs no third time
    assert cli.under_jemalloc("train", argv, dirs=(str(tmp_path),), execve=execve) == str(lib)
    assert len(calls) == 1


def test_training_commands_bound_the_matmul_kernel_caches(tmp_path, monkeypatch, capsys):
    """oneDNN's and ideep's kernel caches (1,024 kernels each by default, ~55 compiled per pass length) grew a
    training process by hundreds of MB: `train` and `quickstart` set them to hold about a pass's worth before the
    first matmul, and keep a value the user set. Other commands leave them alone."""
    from collegeadvisor import cli

    for name in cli.KERNEL_CACHES:  # absent, and as it was after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1  # a bad config still gets them
    assert "missing.yaml" in capsys.readouterr().err
    assert {name: os.environ[name] for name in cli.KERNEL_CACHES} == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128",
                                                                      "LRU_CACHE_CAPACITY": "128"}
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    cli.bounded_kernel_caches("quickstart")
    assert os.environ["LRU_CACHE_CAPACITY"] == "512"
    for name in cli.KERNEL_CACHES:
        monkeypatch.delenv(name)
    cli.bounded_kernel_caches("serve")
    assert not any(name in os.environ for name in cli.KERNEL_CACHES)
