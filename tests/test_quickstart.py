"""The quickstart's deadline (issue 23): training gets what is left of it less a reserve that scales with the
measured speed, max_steps stays the cap, the log names the steps chosen, and the before/after samples answer
through advise. The clock, the preflight, training and everything after it are replaced here: nothing trains, and
nothing depends on how fast this machine runs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from collegeadvisor import quickstart as qs
from collegeadvisor.check.findings import finding
from collegeadvisor.config import duration_text, load_config
from collegeadvisor.runs import write_manifest
from collegeadvisor.train.planner import Rows, for_time, plan

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
CAP = yaml.safe_load(QUICKSTART.read_text())["max_steps"]


# ------------------------------------------------------------------------------------------ the budget
def test_training_gets_what_is_left_less_the_reserve():
    assert qs.training_budget(600, 240) == 360
    assert qs.training_budget(200, 240) == qs.MIN_TRAINING_S  # past the deadline already: a minute, said to miss it
    assert qs.training_budget(600, 240, max_time_s=100) == 100  # a max_time the config sets is kept when shorter


def test_the_reserve_scales_with_the_measured_speed():
    dev = qs.AFTER_TRAINING_TOKENS_PER_S
    assert qs.after_training_s(dev) == qs.AFTER_TRAINING_S
    assert qs.after_training_s(dev / 2) == pytest.approx(2 * qs.AFTER_TRAINING_S)  # half the speed: twice the time
    assert qs.after_training_s(None) == qs.AFTER_TRAINING_S  # not measured: the reference machine's
    assert qs.after_training_s(dev * 3) == qs.AFTER_TRAINING_S  # faster training (bf16) says nothing of inference


def test_measured_speed_is_the_preflights_eta_step():
    eta = finding("info", "environment", "max_steps", "ETA", code="eta", step={"tokens_per_s": 321.0})
    assert qs.measured_speed([finding("info", "environment", "x", "other", code="disk"), eta]) == 321.0
    assert qs.measured_speed([]) is None


def test_steps_line_says_why_the_run_took_its_steps():
    budget = {"max_time_s": 570, "allowed_steps": 153, "step_s": 3.65}
    manifest = {"schedule": {"total_steps": 153, "budget": budget}, "stopped": {"reason": "max_time", "step": 137}}
    assert qs.steps_line(manifest, 180) == ("trained 137 of 153 planned steps (cap: max_steps 180); max_time "
                                            "00:00:09:30 allowed 153 at 3.65 s/step measured; stopped by max_time")
    replanned = budget | {"allowed_steps": 131, "replanned_at": 16, "paced_step_s": 4.31}
    manifest = {"schedule": {"total_steps": 131, "budget": replanned}, "stopped": {"reason": "max_time", "step": 131}}
    assert qs.steps_line(manifest, 180) == ("trained 131 of 131 planned steps (cap: max_steps 180); max_time "
                                            "00:00:09:30 allowed 131 at 4.31 s/step over the first 16 steps (the "
                                            "first measured 3.65); stopped by max_time")


def tiny_rows(n: int = 40) -> Rows:
    row = lambda i: {"input_ids": [1] * (20 + i % 7), "labels": [-100] * 10 + [1] * (10 + i % 7), "line": i + 1}  # noqa: E731
    return Rows([row(i) for i in range(n)], [row(i) for i in range(4)])


def test_max_steps_of_the_quickstart_config_stays_the_cap():
    """The planner takes the fewer of the config's max_steps and the steps the budget allows."""
    cfg = load_config(QUICKSTART, {"max_time": {"seconds": 400}, "max_examples": None})
    cap = plan(cfg, tiny_rows(), "cpu")
    fast = for_time(cfg, cap, {"seconds": 1.0, "tokens": cap.step_tokens})  # 1 s a step: 400 s fit more than 90
    assert fast.total_steps == CAP and fast.limit == "max_steps" and fast.budget["allowed_steps"] > CAP
    slow = for_time(cfg, cap, {"seconds": 10.0, "tokens": cap.step_tokens})  # 10 s a step: about 40 fit
    assert slow.total_steps < CAP and slow.limit == "max_time"
    assert slow.warmup_steps == pytest.approx(cfg.warmup_ratio * slow.total_steps, abs=1)  # its schedule, not 90's


# ------------------------------------------------------------------------------------------ the whole job, replaced
@pytest.fixture
def job(tmp_path, monkeypatch):
    """quickstart() with its clock and every stage replaced: the dataset and preflight take 100 s on a machine at
    half the developers' speed, train's set-up 40 s and its steps 310 s (37 of them), eval 200 s. Returns what
    train was handed and the calls to advise.respond."""
    now = {"t": 1000.0}
    monkeypatch.setattr(qs, "clock", lambda: now["t"])
    questions = [{"question": f"What do {k} graduates earn?", "answer": f"ref {k}", "numeric": None, "kind": k,
                  "source": {}} for k in qs.SAMPLE_KINDS]
    monkeypatch.setattr(qs, "dataset_is_current", lambda d: True)  # no dataset build
    monkeypatch.setattr(qs, "load_questions", lambda path: questions)

    def preflight(cfg):
        now["t"] += 100
        return [finding("info", "environment", "max_steps", "ETA", code="eta",
                        step={"tokens_per_s": qs.AFTER_TRAINING_TOKENS_PER_S / 2})]

    seen = {"handed": {}, "calls": [], "states": []}

    def train(cfg):
        seen["handed"].update(max_time_s=cfg.max_time_s, max_steps=cfg.max_steps)
        run = tmp_path / "run"
        run.mkdir()
        budget = {"max_time_s": cfg.max_time_s, "allowed_steps": 37, "step_s": 8.6} if cfg.max_time_s else None
        write_manifest(run, {"schedule": {"total_steps": 37, "limit": "max_time", "budget": budget},
                             "stopped": {"reason": "max_time", "step": 37, "planned_steps": 37, "elapsed_s": 310.0}})
        now["t"] += 350
        return run

    @contextlib.contextmanager
    def adapter_state(model, on):
        seen["states"].append(on)
        yield

    def respond(model, tok, convs, retrieve, k, **gen):
        seen["calls"].append({"adapter": seen["states"][-1], "retrieve": retrieve, "k": k, **gen})
        hits = [{"document": "row", "metadata": {"school": "Hit U", "credential": "Bachelor", "program": "Law"}}]
        plan = SimpleNamespace(reply=None, decision="answer", why="", hits=hits)
        return [(plan, {"raw": f"answer {c[0]['content']}", "stopped": True,
                        "raw_grounding": {"status": "verified"}}) for c in convs]

    def evaluate(run, heldout, **kw):
        now["t"] += 200
        return tmp_path / "report.json", tmp_path / "report.html"

    monkeypatch.setattr(qs, "preflight", preflight)
    monkeypatch.setattr(qs, "train", train)
    monkeypatch.setattr(qs, "quickstart_kb", lambda questions, kb_dir: (None, "kb_store"))
    monkeypatch.setattr(qs, "load_run", lambda run: ("model", "tok", {"retrieval": {"k": 3}}))
    monkeypatch.setattr(qs, "retriever", lambda k, collection: "hits_for")
    monkeypatch.setattr(qs, "adapter_state", adapter_state)
    monkeypatch.setattr(qs, "respond", respond)
    monkeypatch.setattr(qs, "evaluate", evaluate)
    return seen


def test_quickstart_hands_train_the_budget_and_prints_the_steps(job, tmp_path, capsys):
    qs.quickstart(str(QUICKSTART), out=tmp_path / "out")

    reserve = qs.AFTER_TRAINING_S * 2  # half the reference machine's speed: twice its reserve
    assert job["handed"] == {"max_time_s": qs.QUICKSTART_BUDGET_S - 100 - reserve, "max_steps": CAP}
    out = capsys.readouterr().out
    assert f"time budget: {qs.QUICKSTART_BUDGET_S - 100} s left before the deadline, {reserve} s kept" in out
    assert f"the cap stays max_steps {CAP}" in out
    handed = duration_text(qs.QUICKSTART_BUDGET_S - 100 - reserve)
    assert f"trained 37 of 37 planned steps (cap: max_steps {CAP}); max_time {handed} allowed 37 at 8.6 s/step" in out
    # the whole job's time, and what the reserve stood for: train's set-up (40 s) and what followed (200 s)
    assert f"done in 650 s of the {qs.QUICKSTART_BUDGET_S} s budget; 240 s of it outside training's clock" in out


def test_the_samples_answer_through_advise(job, tmp_path, capsys):
    qs.quickstart(str(QUICKSTART), out=tmp_path / "out")
    # base (its token cap) then tuned, raw answers (no retries), the rows advise planned shown
    assert [(c["adapter"], c["max_new_tokens"], c["retries"], c["k"], c["retrieve"]) for c in job["calls"]] == [
        (False, qs.BASE_MAX_NEW_TOKENS, 0, 3, "hits_for"),
        (True, load_config(QUICKSTART, {}).sample_max_new_tokens, 0, 3, "hits_for")]
    out = capsys.readouterr().out
    assert "[1] Hit U: Bachelor in Law" in out and "tuned: answer What do premium graduates earn?" in out


def test_without_a_budget_train_gets_the_config_as_it_is(job, tmp_path, capsys):
    qs.quickstart(str(QUICKSTART), out=tmp_path / "out", budget_s=None)
    assert job["handed"] == {"max_time_s": None, "max_steps": CAP}
    assert "time budget" not in capsys.readouterr().out
