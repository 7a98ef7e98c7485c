"""One config file for every command: each of eval, chat, serve, kb and export reads its own section of --config,
its flags win over the section, a bad key or value is one line naming the file and `section.key`, and eval, kb and
export write the settings they ran with beside what they wrote."""

import io
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import yaml

from collegeadvisor.cli import build_parser, main
from collegeadvisor.config import (SECTIONS, ChatConfig, Config, EvalConfig, ExportConfig, KbConfig, ServeConfig,
                                   load_config)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str, name: str = "settings.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def settings(model, *argv):
    return model.from_args(build_parser().parse_args(list(argv)))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


SECTIONED = """\
base_model: embedded:smollm2-135m-instruct
max_length: 640
eval:
  max_new_tokens: 64
  k: 2
  compare: true
chat:
  temperature: 0.5
  rag: false
serve:
  port: 9001
  api_key_env: MY_KEY
  cors_origins: [https://a.example]
kb:
  path: my_kb
  k: 7
export:
  to: gguf
  gguf_type: f16
"""


def test_each_command_reads_its_section_and_its_flags_win(tmp_path):
    f = str(write(tmp_path, SECTIONED))
    s = settings(EvalConfig, "eval", "--config", f)
    assert (s.max_new_tokens, s.k, s.compare, s.batch_size) == (64, 2, True, 16)  # section, then defaults
    s = settings(EvalConfig, "eval", "--config", f, "--max-new-tokens", "32", "--no-compare")
    assert (s.max_new_tokens, s.k, s.compare) == (32, 2, False)
    assert settings(ChatConfig, "chat", "--config", f).temperature == 0.5
    assert settings(ChatConfig, "chat", "--config", f, "--temperature", "0", "--rag").model_dump() == {
        **ChatConfig().model_dump(), "rag": True}
    s = settings(ServeConfig, "serve", "--config", f)
    assert (s.port, s.api_key_env, s.cors_origins, s.max_new_tokens) == (9001, "MY_KEY", ["https://a.example"], 256)
    s = settings(ServeConfig, "serve", "--config", f, "--port", "9002", "--cors-origin", "https://b.example")
    assert (s.port, s.cors_origins) == (9002, ["https://b.example"])
    s = settings(KbConfig, "kb", "query", "--config", f, "a question")
    assert (s.path, s.k, s.collection) == ("my_kb", 7, "scorecard")
    assert settings(KbConfig, "kb", "recall", "--config", f, "--questions", "q.jsonl", "--k", "3",
                    "--limit", "9").model_dump() == {**KbConfig().model_dump(), "path": "my_kb", "k": 3}
    s = settings(ExportConfig, "export", "--config", f)
    assert (s.to, s.gguf_type, s.device, s.verify) == ("gguf", "f16", "cpu", 0)
    assert settings(ExportConfig, "export", "--config", f, "--to", "merged", "--verify").model_dump() == {
        **s.model_dump(), "to": "merged", "verify": 8}
    # training reads the top-level keys of the same file and leaves the sections to their commands
    assert load_config(f).max_length == 640


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_the_shipped_configs_load_for_every_command(config):
    load_config(config)
    for model in SECTIONS.values():
        model.load(config)


def test_the_commented_example_in_default_yaml_is_a_valid_config(tmp_path):
    text = (CONFIGS / "default.yaml").read_text(encoding="utf-8")
    example = text[text.index("# eval:"):]
    uncommented = "\n".join(line[2:] if line.startswith("# ") else line for line in example.splitlines())
    f = write(tmp_path, uncommented)
    assert set(yaml.safe_load(uncommented)) == set(SECTIONS)
    for name, model in SECTIONS.items():
        loaded = model.load(f)  # valid keys and values
        assert all(getattr(loaded, k) == v for k, v in yaml.safe_load(uncommented)[name].items())


@pytest.mark.parametrize("argv, text, message", [
    (["eval"], "eval:\n  kk: 1\n", "setting 'eval.kk': unknown setting"),
    (["serve"], "serve:\n  port: abc\n", "setting 'serve.port': Input should be a valid integer"),
    (["chat"], "chat:\n  temperature: -1\n", "setting 'chat.temperature': Input should be greater than or equal to 0"),
    (["kb", "query", "q"], "kb: 5\n", "setting 'kb': expected a mapping of settings, got int"),
    (["export"], "export:\n  to: zip\n", "setting 'export.to': Input should be 'merged', 'gguf' or 'ollama'"),
    (["chat"], "evaluation:\n  k: 1\n", "setting 'evaluation': unknown setting"),
    (["train"], "max_new_tokens: 64\n", "setting 'max_new_tokens': moved: set max_new_tokens in the eval, chat or "
                                        "serve section"),
])
def test_a_bad_section_key_or_value_is_one_line_naming_the_file_and_the_setting(tmp_path, capsys, argv, text,
                                                                               message):
    f = write(tmp_path, text)
    assert main([*argv[:2], "--config", str(f), *argv[2:]] if argv[0] == "kb" else [*argv, "--config", str(f)]) == 1
    assert one_line_error(capsys).startswith(f"error: {f}: {message}")


def test_a_bad_flag_is_one_line_naming_the_flag(capsys):
    assert main(["eval", "--limit", "0"]) == 1
    assert one_line_error(capsys) == "error: --limit 0: Input should be greater than or equal to 1"
    assert main(["export"]) == 1
    assert "--to merged|gguf|ollama" in one_line_error(capsys)


def test_old_manifests_resume_without_the_retired_setting():
    saved = {**Config().model_dump(), "max_new_tokens": 256}
    assert Config.from_manifest(saved) == Config()


def test_recompute_mlp_is_a_share_and_reads_the_old_booleans():
    """recompute_mlp was true/false: old YAML files and manifests read as every layer and none."""
    assert Config().recompute_mlp == 0.5
    assert Config(recompute_mlp=True).recompute_mlp == 1.0 and Config(recompute_mlp=False).recompute_mlp == 0.0
    assert Config.from_manifest({**Config().model_dump(), "recompute_mlp": True}).recompute_mlp == 1.0
    with pytest.raises(ValueError):
        Config(recompute_mlp=1.5)


def test_eval_reads_its_section_and_writes_its_settings_beside_the_report(trained_run, tmp_path, capsys):
    out = tmp_path / "report"
    f = write(tmp_path, f"eval:\n  run: {trained_run}\n  out: {out}\n  limit: 3\n  max_new_tokens: 4\n"
                        f"  batch_size: 2\n  rag: false\n")
    assert main(["eval", "--config", str(f), "--limit", "1"]) == 0
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert (meta["n_questions"], meta["max_new_tokens"], meta["retrieval"]) == (1, 4, False)  # flag, section, section
    written = out / "config.yaml"
    assert f"settings: {written}" in capsys.readouterr().out
    again = EvalConfig.load(written)  # the file it wrote is a config that repeats the run
    assert again == EvalConfig(run=str(trained_run), out=str(out), limit=1, max_new_tokens=4, batch_size=2, rag=False)


def test_export_reads_its_section_and_writes_its_settings_beside_the_folder(trained_run, tmp_path):
    f = write(tmp_path, f"export:\n  run: {trained_run}\n  to: gguf\n  out: {tmp_path / 'unused'}\n")
    out = tmp_path / "merged"
    assert main(["export", "--config", str(f), "--to", "merged", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and not (tmp_path / "unused").exists()
    written = tmp_path / "merged.config.yaml"
    assert not (out / "merged.config.yaml").exists()  # beside the export, not in the folder other tools load
    assert ExportConfig.load(written) == ExportConfig(run=str(trained_run), to="merged", out=str(out))


def test_kb_build_and_query_read_the_section_and_build_writes_its_settings_into_the_store(tmp_path, capsys):
    store = tmp_path / "kb"
    f = write(tmp_path, f"kb:\n  path: {store}\n  limit: 30\n  batch_size: 8\n  k: 2\n")
    assert main(["kb", "build", "--config", str(f), "--limit", "12"]) == 0
    out = capsys.readouterr().out
    assert "count=12" in out and f"settings: {store / 'config.yaml'}" in out
    assert KbConfig.load(store / "config.yaml") == KbConfig(path=str(store), limit=12, batch_size=8, k=2)
    assert main(["kb", "query", "--config", str(f), "What do graduates earn?"]) == 0
    assert len(re.findall(r"^\[\d\] ", capsys.readouterr().out, re.M)) == 2  # k from the section
    assert main(["kb", "query", "--config", str(f), "--k", "3", "What do graduates earn?"]) == 0
    assert len(re.findall(r"^\[\d\] ", capsys.readouterr().out, re.M)) == 3


def test_chat_reads_its_section_flags_win_and_the_settings_are_logged(trained_run, tmp_path, monkeypatch, capsys):
    from collegeadvisor.generate import generate
    from collegeadvisor.runs import load_run

    model, tok, _ = load_run(trained_run, merge=True)
    ask = "What is the median debt for program 9 at school 2?"
    expected = {n: generate(model, tok, [[{"role": "user", "content": ask}]], max_new_tokens=n)[0]["text"].strip()
                for n in (2, 12)}
    assert expected[2] != expected[12]
    f = write(tmp_path, f"chat:\n  run: {trained_run}\n  max_new_tokens: 2\n  rag: false\n")
    for argv, n in ((), 2), (("--max-new-tokens", "12"), 12):
        monkeypatch.setattr(sys, "stdin", io.StringIO(ask + "\n"))
        assert main(["chat", "--config", str(f), *argv]) == 0
        captured = capsys.readouterr()
        assert f"advisor> {expected[n]}\n" in captured.out
        line = next(x for x in captured.err.splitlines() if x.startswith("settings: "))
        logged = yaml.safe_load(line.removeprefix("settings: "))
        assert logged["chat"] == {**ChatConfig().model_dump(), "run": str(trained_run), "max_new_tokens": n,
                                  "rag": False}


def test_serve_reads_its_section_and_flags_win(trained_run, tmp_path, capsys):
    with socket.socket() as a, socket.socket() as b:
        for s in (a, b):
            s.bind(("127.0.0.1", 0))
            s.listen(1)
        taken_a, taken_b = a.getsockname()[1], b.getsockname()[1]
        f = write(tmp_path, f"serve:\n  run: {trained_run}\n  host: 127.0.0.1\n  port: {taken_a}\n")
        assert main(["serve", "--config", str(f)]) == 1
        assert f"port {taken_a} on 127.0.0.1 is already in use" in one_line_error(capsys)
        assert main(["serve", "--config", str(f), "--port", str(taken_b)]) == 1
        assert f"port {taken_b} on 127.0.0.1 is already in use" in one_line_error(capsys)
