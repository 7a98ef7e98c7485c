"""Kill anywhere, resume exactly (short versions; `make reliability` runs the long ones): the real `collegeadvisor`
commands are SIGKILLed at random moments and while they write, then rerun. Training resumes with the loss of an
uninterrupted run at every step and the same adapter bytes; SIGTERM and Ctrl-C save a checkpoint and exit 143 /
130; the dataset builder, `kb build` and `export` end with the same output, and nothing half-written is ever
published. The mechanism is bench/kill_resume.py's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kill_resume


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("kills")


def test_training_killed_twice_resumes_exactly(work):
    result = kill_resume.train_kills(work, kills=2, steps=12, seed=3, log=print)
    assert result["kills"] == 2 and result["mid_write"] >= 1, result["events"]
    assert result["exact"] and result["max_loss_diff"] == 0.0 and result["steps_compared"] == 12, result
    assert all(e["intact_checkpoints"] >= 1 or e["target_step"] <= 1 for e in result["events"])


def test_sigterm_and_ctrl_c_checkpoint_and_exit_cleanly(work):
    result = kill_resume.signal_stops(work, steps=12, log=print)
    assert [s["exit_code"] for s in result["stops"]] == [143, 130], result
    assert result["ok"] and result["exact"], result


def test_dataset_builder_killed_three_times_ends_identical(work):
    result = kill_resume.dataset_kills(work, kills=3, n=1500, log=print)
    assert result["kills"] == 3 and result["ok"], result


def test_export_killed_twice_ends_identical(work):
    result = kill_resume.export_kills(work, kills=2, log=print)
    assert result["kills"] == 2 and result["ok"], result


def test_kb_build_killed_mid_batch_has_no_duplicate_or_missing_rows(work):
    result = kill_resume.kb_kills(work, kills=1, limit=600, batch=100, log=print)
    assert result["kills"] == 1 and result["duplicates"] == 0 and result["missing"] == 0, result
    assert result["ok"], result
