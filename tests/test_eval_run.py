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
    import collegeadvisor.generate as gen

    monkeypatch.setattr(gen, "generate", lambda model, tok, convs, **kw: [
        {"text": "", "ids": [], "stopped": True, "n_tokens": 0} for _ in convs])
    report_json, _ = eval_run.evaluate(trained_run, out_dir=tmp_path / "ev", max_new_tokens=4)
    tuned = json.loads(report_json.read_text())["results"]["tuned"]
    assert tuned["empty_rate"] == 1.0 and tuned["numeric_accuracy"] == 0.0


ROWS = [
    "Test University (OH, public): Bachelor's Degree in Nursing. Completers: 40. Median earnings four years after "
    "completion: $30,111. High-school graduate earnings in OH: $26,111. Earnings premium: $4,000 (passes the test). "
    "Median debt: $21,000. Debt-to-earnings: 0.70. Payback: 6.1 years.",
    "Test University (OH, public): Master's Degree in Nursing. Median earnings: no data (suppressed). High-school "
    "graduate earnings in OH: $26,111. Earnings premium: no data. Median debt: no data.",
]


def fake_retriever(question: str) -> list[dict]:
    return [{"id": f"x:{i}:3", "document": d, "metadata": {"school": "Test University"}, "distance": 0.1}
            for i, d in enumerate(ROWS, 1)]


def test_eval_with_retrieval_goes_through_the_constraint_and_reports_raw_and_served(trained_run, tmp_path,
                                                                                   monkeypatch):
    import collegeadvisor.generate as gen

    seen = []
    real = gen.GroundedDecoding

    class Spy(real):
        def __call__(self, input_ids, scores):
            seen.append(len(self.rules))
            return super().__call__(input_ids, scores)

    monkeypatch.setattr(gen, "GroundedDecoding", Spy)
    report_json, report_html = eval_run.evaluate(trained_run, out_dir=tmp_path / "ev", retriever=fake_retriever,
                                                 max_new_tokens=12)
    data = json.loads(report_json.read_text())
    assert seen and set(data["results"]) == {"tuned+rag", "tuned+rag (served)"}
    raw = data["results"]["tuned+rag"]
    assert raw["outside_context_rate"] == 0.0  # by construction
    assert set(raw["attribution"]) == {"retrieval_miss", "reading_error", "abstention_error"}
    wrong = sum(raw["attribution"].values())
    graded = [s["scores"] for s in data["samples"]["tuned+rag"]]
    assert wrong == sum(1 for s in graded if s["attribution"])
    assert all(s["rows"] == ["x:1:3", "x:2:3"] for s in data["samples"]["tuned+rag"])
    assert "Why answers were wrong" in report_html.read_text()


def test_attribution_sorts_wrong_answers():
    from collegeadvisor.eval.metrics import score_reply

    rec = {"question": "q", "answer": "a", "numeric": 30111.0, "kind": "earnings", "source": {"row_id": "x:1:3"}}
    right = "[1] N. Median earnings four years after completion: $30,111."
    assert score_reply(rec, right, True, 9, ROWS, ["x:1:3", "x:2:3"])["attribution"] is None
    other_field = "[1] N. Median debt: $21,000."
    assert score_reply(rec, other_field, True, 9, ROWS, ["x:1:3", "x:2:3"])["attribution"] == "reading_error"
    assert score_reply(rec, right.replace("30,111", "26,111"), True, 9, ROWS, ["x:9:3"])["attribution"] == \
        "retrieval_miss"
    abstained = "[1] N. Median earnings: no data."
    scored = score_reply(rec, abstained, True, 9, ROWS, ["x:1:3"])
    assert scored["attribution"] == "abstention_error" and scored["grounded"] is False
    no_data = {"question": "q", "answer": "a", "numeric": None, "kind": "no_data", "source": {"row_id": "x:2:3"}}
    assert score_reply(no_data, "[1] N. Median earnings: $30,111.", True, 9, ROWS, ["x:1:3", "x:2:3"])[
        "attribution"] == "abstention_error"
    assert score_reply(rec, "[1] N. Median earnings: $99,999.", True, 9, ROWS, ["x:1:3"])["outside_context"]


def test_chat_answers_a_piped_question(trained_run):
    proc = subprocess.run([sys.executable, "-m", "collegeadvisor.cli", "chat", "--run", str(trained_run),
                           "--max-new-tokens", "6"], input="What do nurses earn?\n/reset\nAnd debt?\n/exit\nignored\n",
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("advisor> ") == 2 and "(conversation reset)" in proc.stdout
