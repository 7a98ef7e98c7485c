import subprocess
import sys

import pytest

from collegeadvisor.errors import ModelError
from collegeadvisor.models import pick_dtype, resolve_base_model


def test_hub_id_without_a_hub_says_so_and_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"cannot fetch 'TinyLlama/TinyLlama-1.1B-Chat-v1.0'.*hub unreachable.*--base-model DIR"):
        resolve_base_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "collegeadvisor.cli", "train", "--base-model", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
         "--data", str(data), "--output-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: --base-model: cannot fetch")
    assert "Traceback" not in proc.stderr


def test_missing_folder_and_folder_without_model(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_base_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_base_model(str(tmp_path))


def test_local_folder_resolves(tiny_model):
    assert resolve_base_model(str(tiny_model)) == str(tiny_model.resolve())


def test_dtype_policy():
    import torch

    assert pick_dtype("cpu") is torch.float32
    with pytest.warns(UserWarning, match="fp16 on mps"):
        assert pick_dtype("mps", "fp16") is torch.float16
    with pytest.raises(ModelError, match="--dtype"):
        pick_dtype("cpu", "int3")
