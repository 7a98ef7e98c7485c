import json
import subprocess
import sys

import pytest

from collegeadvisor.errors import ManifestError
from collegeadvisor.eval import run as eval_run
from collegeadvisor.eval.metrics import METRICS
from collegeadvisor.fsutil import atomic_write_json
from collegeadvisor.generate import generate
from collegeadvisor.runs import find_run, load_run, read_manifest


def test_run_from_another_base_model_is_refused(trained_run, tmp_path, smol_tiny_model):
    with pytest.raises(ManifestError, match="trained on base model .* not '/elsewhere'"):
        load_run(trained_run, base_model="/elsewhere")
    # a copy of the run whose manifest was edited to claim another base model's folder, with the old hash
    import shutil

    forged = tmp_path / "forged"
    shutil.copytree(trained_run, forged)
    m = read_manifest(forged)
    m["base_model"]["spec"] = str(smol_tiny_model)
    atomic_write_json(forged / "manifest.json", m)
    with pytest.raises(ManifestError, match="config_sha256 .* refusing to load its adapter on another model"):
        load_run(forged)


def test_latest_skips_failed_and_running_runs(trained_run, tmp_path):
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(trained_run, root / "good")
    for name, status in (("newer-failed", "failed"), ("newer-running", "running")):
        shutil.copytree(trained_run, root / name)
        m = read_manifest(root / name)
        m.update(status=status, finished="9999")
        atomic_write_json(root / name / "manifest.json", m)
    assert find_run("latest", root) == root / "good"
    with pytest.raises(ManifestError, match="status is 'failed'"):
        find_run(root / "newer-failed")


def test_batched_greedy_text_equals_one_at_a_time(trained_run):
    model, tok, _ = load_run(trained_run)
    convs = [[{"role": "user", "content": q}] for q in
             ["What do graduates earn?", "Is a Bachelor's Degree in Nursing at Ohio State University worth it?",
              "Debt?", "What is the admission rate at Stanford University? Please answer briefly."]]
    batched = generate(model, tok, convs, max_new_tokens=12, batch_size=4)
    single = [generate(model, tok, [c], max_new_tokens=12, batch_size=1)[0] for c in convs]
    assert [b["ids"] for b in batched] == [s["ids"] for s in single]
    assert [b["text"] for b in batched] == [s["text"] for s in single]


def test_merged_adapter_gives_the_same_text_and_base_comes_back(trained_run):
    model, tok, _ = load_run(trained_run)
    convs = [[{"role": "user", "content": q}] for q in ["What do graduates earn?", "Debt at Ohio State University?"]]
    lora = generate(model, tok, convs, max_new_tokens=12)
    with model.disable_adapter():
        base = generate(model, tok, convs, max_new_tokens=12)
    assert [r["ids"] for r in lora] != [r["ids"] for r in base]  # the adapter matters, so the checks below bite
    with eval_run.adapter_state(model, True):
        assert generate(model, tok, convs, max_new_tokens=12) == lora
        # the merge changed the base weights; the base context must undo it
        with eval_run.adapter_state(model, False):
            assert generate(model, tok, convs, max_new_tokens=12) == base
    merged_model, _, _ = load_run(trained_run, merge=True)
    assert generate(merged_model, tok, convs, max_new_tokens=12) == lora
    assert any(getattr(m, "merged", False) for m in merged_model.modules())


def test_compare_writes_both_reports_with_every_metric(trained_run, tmp_path):
    report_json, report_html = eval_run.evaluate(trained_run, out_dir=tmp_path / "ev", compare=True, max_new_tokens=8)
    data = json.loads(report_json.read_text())
    assert set(data["results"]) == {"base", "tuned"}
    for system in ("base", "tuned"):
        assert set(METRICS) <= set(data["results"][system])
        assert data["results"][system]["perplexity"] > 1
    assert "data:image/png;base64" in report_html.read_text()


def test_empty_reply_is_scored_not_a_crash(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_run, "generate", lambda model, tok, convs, **kw: [
        {"text": "", "ids": [], "stopped": True, "n_tokens": 0} for _ in convs])
    report_json, _ = eval_run.evaluate(trained_run, out_dir=tmp_path / "ev", max_new_tokens=4)
    tuned = json.loads(report_json.read_text())["results"]["tuned"]
    assert tuned["empty_rate"] == 1.0 and tuned["numeric_accuracy"] == 0.0


def test_chat_answers_a_piped_question(trained_run):
    proc = subprocess.run([sys.executable, "-m", "collegeadvisor.cli", "chat", "--run", str(trained_run),
                           "--max-new-tokens", "6"], input="What do nurses earn?\n/reset\nAnd debt?\n/exit\nignored\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("advisor> ") == 2 and "(conversation reset)" in proc.stdout
