"""Faults on disk and hostile files (bench/faults.py's scenarios): ENOSPC / EIO injected into the writes of a
checkpoint inside a real training run, a metrics log, a manifest, a dataset and an export, and a real OS
file-size limit under training; every one ends with an error naming the path and the cause, the previous state
intact, and a resume that equals an uninterrupted run. Pickles that would run code, tampered hashes, symlinks
and paths out of a run are refused with a clear message, and no pickle runs."""

from __future__ import annotations

import errno
import resource
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import faults


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


def check(result: dict) -> None:
    assert result["ok"], result


@pytest.mark.parametrize("code, op, match", [
    (errno.ENOSPC, "write", "trainer_tensors"),
    (errno.EIO, "fsync", "adapter_model"),
    (errno.ENOSPC, "write", "/metrics.jsonl"),
])
def test_training_survives_a_failed_write(work, code, op, match):
    result = faults.training_fault(work, code, op, match)
    check(result)
    assert "cannot write" in result["message"] and result["resumed_exact"]


@pytest.mark.parametrize("code, op", [(errno.ENOSPC, "write"), (errno.EIO, "fsync")])
def test_manifest_and_dataset_keep_the_previous_version(work, code, op):
    check(faults.manifest_fault(work, code, op))
    check(faults.dataset_fault(work, code, op))


def test_export_keeps_the_previous_export(work):
    check(faults.export_fault(work, errno.EIO, "fsync"))


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="changing a running process's file-size limit: Linux")
def test_training_under_a_real_file_size_limit(work):
    result = faults.training_os_fault(work)
    check(result)
    assert "(EFBIG)" in result["message"]


def test_hostile_checkpoints_are_refused(work):
    results = faults.hostile_checkpoints(work)
    assert len(results) == 4 and all(r["ok"] for r in results), results
    assert not (work / "hostile" / faults.MARKER_NAME).exists()


def test_hostile_runs_are_refused(work):
    results = faults.hostile_runs(work)
    assert len(results) == 7 and all(r["ok"] for r in results), results


def test_hostile_exports_datasets_and_stores_are_refused(work):
    results = faults.hostile_exports_data_kb(work)
    assert len(results) == 5 and all(r["ok"] for r in results), results
    assert not (work / "hostile" / faults.MARKER_NAME).exists()


def test_nothing_in_the_package_unpickles():
    """No torch.load without weights_only=True, no pickle.load / np.load(allow_pickle) / pandas.read_pickle."""
    src = Path(__file__).resolve().parents[1] / "src" / "collegeadvisor"
    import re

    bad = re.compile(r"pickle\.loads?\(|read_pickle\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                     r"torch\.load\((?![^)]*weights_only\s*=\s*True)")
    hits = [f"{p.relative_to(src)}:{n}" for p in src.rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert hits == []
