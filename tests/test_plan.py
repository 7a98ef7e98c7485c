"""One plan: what `check` reports (steps, epochs, precision, rows kept and dropped) is what `train` then does, for a
handful of configs and datasets. Each case runs the preflight, then trains and compares with what training did:
the manifest, metrics.jsonl and the rows its optimizer steps saw."""

import pytest

from collegeadvisor import check
from collegeadvisor.config import load_config
from collegeadvisor.runs import read_manifest
from collegeadvisor.train import recipe, train
from helpers import advisor_rows, read_jsonl, write_jsonl

LONG = " ".join(f"In year {i} graduates earned {30 + i} thousand dollars." for i in range(12))


def long_rows(n=24):
    """Every third answer far longer than the rest: cut at a small max_length."""
    return [{"instruction": f"What do graduates of program {i} earn?",
             "output": LONG if i % 3 == 0 else f"A median of ${30000 + 37 * i:,}."} for i in range(n)]


CASES = {
    "epochs": (advisor_rows(20), dict(batch_size=4, grad_accum=1, epochs=1, val_fraction=0.1)),
    "accumulated-ungrouped-sampled": (advisor_rows(30), dict(batch_size=3, grad_accum=2, epochs=2, val_fraction=0.2,
                                                             max_examples=12, group_by_length=False, seed=3)),
    "dropped-too-long": (long_rows(), dict(max_length=64, truncation="drop", batch_size=2, grad_accum=2, epochs=1)),
    "cut-fp32-packed": (long_rows(), dict(max_length=64, truncation="truncate", batch_size=4, grad_accum=1,
                                          epochs=1.5, autocast_bf16="off", base_bf16="off", packing=True)),
    "bf16-max-steps": (advisor_rows(16), dict(dtype="bf16", batch_size=4, grad_accum=1, max_steps=5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_reports_the_plan_train_runs(tmp_path, tinyllama_tiny_model, monkeypatch, case):
    rows, settings = CASES[case]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = load_config(None, dict(base_model=str(tinyllama_tiny_model), data=str(data), output_dir=str(tmp_path / "runs"),
                                 run_name="r", learning_rate=1e-3, sample_every=0, log_every=1, save_every=1000,
                                 **settings))
    findings = check.run_checks(cfg, measure=False, stages=("train",))
    plan = next(f for f in findings if f.code == "plan").data

    seen: list = []
    real_step = recipe.Training.optimizer_step

    def step(self, group):
        seen.extend(r["line"] for r in group)
        return real_step(self, group)

    monkeypatch.setattr(recipe.Training, "optimizer_step", step)
    m = read_manifest(train(cfg, log=lambda *_: None))
    logged = [r for r in read_jsonl(tmp_path / "runs" / "r" / "metrics.jsonl") if "loss" in r]

    # steps and epochs
    assert plan["total_steps"] == m["schedule"]["total_steps"] == m["metrics"]["steps"] == logged[-1]["step"]
    assert plan["micro_batches_per_epoch"] == m["schedule"]["micro_batches_per_epoch"]
    assert round(plan["epochs"], 3) == logged[-1]["epoch"]
    assert plan["effective_batch"] == m["schedule"]["effective_batch"]
    # precision
    assert (plan["dtype"], plan["autocast"], plan["base_bf16"]) == (m["dtype"], m["autocast_bf16"], m["base_bf16"])
    # the rows kept and dropped: counts as train's data step reports them, lines as its optimizer steps saw them
    train_stats = m["data"]["train"]
    assert plan["kept"] == train_stats["kept"] == len(plan["kept_lines"])
    assert plan["dropped"]["too_long"] == train_stats["dropped_too_long"]
    assert plan["dropped"]["truncated"] == train_stats["truncated"]
    assert plan["dropped"]["lines"] == train_stats["dropped_lines"]
    assert set(seen) <= set(plan["kept_lines"]) and not set(seen) & set(plan["dropped"]["lines"])
    if plan["epochs"] >= 1:  # a whole pass: every kept row trained
        assert set(seen) == set(plan["kept_lines"])
    # the length check counts the same cut answers train drops or cuts
    cut = [f for f in findings if f.code == "answers-cut"]
    dropped_or_cut = train_stats["dropped_too_long"] + train_stats["truncated"]
    assert (len(cut[0].data["wheres"]) if cut else 0) == dropped_or_cut
    if case in ("dropped-too-long", "cut-fp32-packed"):
        assert dropped_or_cut > 0


def test_eta_and_memory_come_from_the_plan(tmp_path, smol_tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", advisor_rows(24))
    cfg = load_config(None, dict(base_model=str(smol_tiny_model), data=str(data), output_dir=str(tmp_path / "runs"),
                                 batch_size=4, grad_accum=2, epochs=2))
    findings = check.run_checks(cfg, stages=("train",))
    plan = next(f for f in findings if f.code == "plan").data
    eta = next(f for f in findings if f.code == "eta")
    ram = next(f for f in findings if f.code == "ram")
    assert eta.data["plan"] == plan and f"for {plan['total_steps']} steps ({plan['epochs']:.2f} epochs)" in eta.message
    assert {k: ram.data[k] for k in plan["memory"]} == plan["memory"]


def test_check_reports_the_steps_train_plans_for_max_time(tmp_path, tinyllama_tiny_model, monkeypatch):
    """With max_time, check's ETA gives the steps the budget allows at its measured speed: at the same speed, the
    steps train plans at its start."""
    data = write_jsonl(tmp_path / "data.jsonl", advisor_rows(40))
    cfg = load_config(None, dict(base_model=str(tinyllama_tiny_model), data=str(data), output_dir=str(tmp_path / "runs"),
                                 run_name="r", batch_size=4, grad_accum=2, epochs=3, sample_every=0,
                                 max_time="00:00:00:30"))
    # the same speed (50 tokens/s) for check's measured micro-batch and for train's measured first step
    monkeypatch.setattr(check, "measure_step", lambda *a: {"tokens_per_s": 50.0, "seconds": 4.0, "tokens": 200,
                                                           "peak_rss": 0, "rss_before": 0})
    monkeypatch.setattr(recipe.Training, "measure_step", lambda self: {"seconds": 14.0, "tokens": 700})
    findings = check.run_checks(cfg, stages=("train",))
    plan = next(f for f in findings if f.code == "plan")
    eta = next(f for f in findings if f.code == "eta")
    assert "max_time 00:00:00:30: train plans the steps that fit it (at most these)" in plan.message
    state = recipe.setup(cfg, log=lambda *_: None)
    assert eta.data["steps"] == state.plan.total_steps < plan.data["total_steps"]
    n = state.plan.total_steps
    assert eta.where == "max_time" and f"for {n} steps" in eta.message
    assert f"max_time 00:00:00:30 allows {n} steps" in eta.message
    assert eta.data["eta_seconds"] <= 30
