"""The evaluation report: report.json holds everything, report.html is self-contained and escapes replies."""

from __future__ import annotations

import json
import re

from collegeadvisor.eval.metrics import METRICS, aggregate, score_reply
from collegeadvisor.eval.report import write_report
from helpers import write_jsonl

RECORDS = [
    {"question": "How much do nursing grads from X make?", "answer": "A median of $65,432 (College Scorecard).",
     "numeric": 65432.0, "kind": "earnings", "source": {}},
    {"question": "Is a BA at Y worth it?", "answer": "No. Graduates earn $3,000 less.", "numeric": -3000.0,
     "kind": "premium", "yes": False, "source": {}},
    {"question": "Median debt at Z?", "answer": "The College Scorecard has no median debt data: suppressed.",
     "numeric": None, "kind": "no_data", "source": {}},
]
REPLIES = {
    "base": ["<script>alert('x')</script> about $10,000", "", "\x00\x00\ud800 garbage"],
    "tuned": ["A median of $65,432.", "No, they earn $3,000 less.", "No data: it is suppressed."],
}


def _system(name):
    rows, scores = [], []
    for rec, reply in zip(RECORDS, REPLIES[name]):
        s = score_reply(rec, reply, stopped_at_eos=name == "tuned", n_tokens=len(reply))
        scores.append(s)
        rows.append({"question": rec["question"], "reference": rec["answer"], "reply": reply, "scores": s})
    extra = {"latency_s": [0.5, 0.7, 0.9]} if name == "tuned" else {}
    return aggregate(scores, extra=extra), rows


def _report(tmp_path, metrics_jsonl=None):
    results, samples = {}, {}
    for name in REPLIES:
        results[name], samples[name] = _system(name)
    return write_report(tmp_path / "out", results, samples, metrics_jsonl, meta={"base_model": "tiny <model>"})


def test_write_report_files_and_json(tmp_path):
    metrics = write_jsonl(tmp_path / "metrics.jsonl", [
        {"step": 10, "loss": 2.3, "lr": 1e-4, "tokens_per_s": 900.0, "rss_mb": 2100.0},
        {"step": 20, "loss": 1.9, "lr": 1e-4, "tokens_per_s": 910.0, "rss_mb": 2150.5},
        {"step": 20, "epoch": 1, "val_loss": 2.0},
    ])
    json_path, html_path = _report(tmp_path, metrics)
    assert json_path.name == "report.json" and html_path.name == "report.html"
    data = json.loads(json_path.read_text())
    assert set(data["results"]) == {"base", "tuned"}
    for res in data["results"].values():
        assert set(METRICS) <= set(res)
    assert data["results"]["tuned"]["numeric_accuracy"] == 1.0
    assert data["results"]["base"]["empty_rate"] == 1 / 3
    assert data["results"]["tuned"]["latency_s_p50"] == 0.7
    assert data["training_curve"]["loss"] == [[10, 2.3], [20, 1.9]]
    assert data["training_curve"]["val_loss"] == [[20, 2.0]]
    assert data["training_curve"]["tokens_per_s"] == [[10, 900.0], [20, 910.0]]
    assert data["training_curve"]["rss_mb"] == [[10, 2100.0], [20, 2150.5]]
    assert data["samples"]["base"][0]["reply"].startswith("<script>")
    assert data["meta"]["base_model"] == "tiny <model>"

    page = html_path.read_text()
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)) == 3  # loss, pace, results
    assert 'alt="training tokens per second and resident memory over the steps"' in page
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "tiny &lt;model&gt;" in page
    assert not re.search(r'(?:src|href)="(?!data:)', page)  # self-contained: no external resources
    assert "wrong figure" in page and "empty reply" in page and "not stopped at EOS" in page
    assert "missed no-data" in page
    assert "\\x00\\x00" in page  # control characters shown, not written raw
    assert "\x00" not in page
    for spec in METRICS.values():
        assert spec["label"] in page


def test_write_report_without_training_metrics(tmp_path):
    json_path, html_path = _report(tmp_path, tmp_path / "missing.jsonl")
    page = html_path.read_text()
    assert "not readable" in page
    assert len(re.findall(r"data:image/png;base64,", page)) == 1  # results chart only
    assert json.loads(json_path.read_text())["training_curve"]["loss"] == []

    no_loss = tmp_path / "metrics.jsonl"
    no_loss.write_text('{"step": 1, "lr": 0.001}\nnot json\n')
    _, html_path = _report(tmp_path, no_loss)
    assert "no loss values" in html_path.read_text()


def test_write_report_empty_inputs(tmp_path):
    json_path, html_path = write_report(tmp_path / "empty", {"base": aggregate([])}, {"base": []})
    data = json.loads(json_path.read_text())
    assert all(data["results"]["base"][m] is None for m in METRICS)
    page = html_path.read_text()
    assert "No sample answers." in page and "No metric values." in page
