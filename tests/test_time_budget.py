"""max_time: the setting's forms and errors, the steps the planner fits in a budget at a measured speed, and a run
that the budget stops early (checkpoint, manifest "stopped", --resume). The clock and the measured speed are
replaced here, so nothing depends on how fast this machine runs."""

from __future__ import annotations

import argparse
import datetime
import math

import pytest

from collegeadvisor.config import Config, load_config, max_time_seconds
from collegeadvisor.errors import AdvisorError
from collegeadvisor.runs import read_manifest
from collegeadvisor.train import checkpoint, recipe, setup, train
from collegeadvisor.train.planner import REPLAN_AFTER, VAL_COST, Rows, for_time, plan, replan, replan_step
from helpers import advisor_rows, read_jsonl, write_jsonl

# ------------------------------------------------------------------------------------------ the setting
ACCEPTED = [
    ("00:00:10:00", 600), ("1:02:03:04", 93784), ("02:30:00", 9000), (" 00:01:30 ", 90), ("00:90:00", 5400),
    ({"minutes": 10}, 600), ({"hours": 1, "minutes": 30}, 5400), ({"days": 1, "seconds": 0.5}, 86400.5),
    (datetime.timedelta(minutes=2), 120),
]


@pytest.mark.parametrize("value,seconds", ACCEPTED, ids=[str(v) for v, _ in ACCEPTED])
def test_accepted_forms_parse_to_seconds(value, seconds):
    if not isinstance(value, datetime.timedelta):
        assert max_time_seconds(value) == seconds
    assert load_config(None, {"max_time": value}).max_time_s == seconds


def test_no_max_time_is_no_budget():
    assert load_config(None, {}).max_time_s is None and max_time_seconds(None) is None


BAD = [
    ("10:00", "'10:00' is ambiguous (hours:minutes or minutes:seconds?)"),
    ("1h30", "'1h30' is not a duration"),
    ("1:02:03:04:05", "is not a duration"),
    ("00:-1:00", "is not a duration"),
    ("", "is not a duration"),
    ("00:00:00", "no time at all"),
    (600, "got the number 600; write a quoted 'HH:MM:SS'"),
    ({"mins": 10}, "unknown key 'mins'; expected days, hours, minutes, seconds"),
    ({"minutes": -1}, "minutes: expected a number >= 0, got -1"),
    ({"minutes": "ten"}, "minutes: expected a number >= 0, got 'ten'"),
    ({}, "no time at all"),
    (["00:10:00"], "got list"),
]


@pytest.mark.parametrize("value,why", BAD, ids=[str(v) for v, _ in BAD])
def test_bad_values_are_one_line_naming_the_setting(value, why):
    with pytest.raises(AdvisorError) as caught:
        load_config(None, {"max_time": value})
    msg = str(caught.value)
    assert msg.startswith("defaults: setting 'max_time': ") and why in msg and "\n" not in msg


def test_yaml_file_and_cli_option(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text('max_time: "01:30:00"\n')
    assert load_config(f).max_time_s == 5400
    f.write_text("max_time: {hours: 1, minutes: 30}\n")
    assert load_config(f).max_time_s == 5400
    f.write_text("max_time: 1:30:00\n")  # unquoted: YAML 1.1 reads a base-60 number
    with pytest.raises(AdvisorError, match=rf"^{f}: setting 'max_time': got the number 5400; write a quoted"):
        load_config(f)
    p = argparse.ArgumentParser()
    Config.add_arguments(p)
    assert Config.from_args(p.parse_args(["--max-time", "00:00:10:00"])).max_time_s == 600
    with pytest.raises(AdvisorError, match=r"^--max-time 10:00: '10:00' is ambiguous"):
        Config.from_args(p.parse_args(["--max-time", "10:00"]))
    f.write_text("max_time: {minutes: 5}\n")
    assert Config.from_args(p.parse_args(["--config", str(f), "--max-time", "none"])).max_time is None


# ------------------------------------------------------------------------------------------ the planner
def rows(n_train=40, n_val=6) -> Rows:
    def row(i):
        return {"input_ids": [1] * (20 + i % 7), "labels": [-100] * 10 + [1] * (10 + i % 7), "line": i + 1}

    return Rows([row(i) for i in range(n_train)], [row(i) for i in range(n_val)])


def budget_plan(**kw):
    cfg = load_config(None, dict(max_time="00:00:01:40", batch_size=4, grad_accum=2, epochs=50) | kw)
    return cfg, plan(cfg, rows(), "cpu")


@pytest.mark.parametrize("step_s", [0.5, 1.0, 2.0, 4.0])
def test_planned_steps_fill_the_budget_at_the_measured_step_time(step_s):
    cfg, cap = budget_plan()
    p = for_time(cfg, cap, {"seconds": step_s, "tokens": cap.step_tokens})  # a step of average size took step_s
    val_s = cap.val_tokens * VAL_COST * step_s / cap.step_tokens  # one validation pass, at the same speed
    used = p.total_steps * step_s + math.ceil(p.epochs) * val_s
    assert used <= 100 < used + step_s + val_s  # fits the 100 s, and one more step would not
    assert p.limit == "max_time" and p.total_steps < cap.total_steps and p.budget["step_s"] == pytest.approx(step_s)
    # the schedule is the one of a run of that many steps
    assert p.warmup_steps == math.ceil(cfg.warmup_ratio * p.total_steps)
    assert p.epochs == pytest.approx(p.total_steps * cfg.grad_accum / cap.micro_batches_per_epoch)


def test_steps_follow_the_measured_speed_not_the_measured_steps_size():
    cfg, cap = budget_plan()
    slow = for_time(cfg, cap, {"seconds": 2.0, "tokens": cap.step_tokens}).total_steps
    fast = for_time(cfg, cap, {"seconds": 1.0, "tokens": cap.step_tokens}).total_steps
    assert fast >= 2 * slow - 1 and slow < fast
    # a first step twice the average size, in twice the time: the same speed, the same steps
    assert for_time(cfg, cap, {"seconds": 2.0, "tokens": 2 * cap.step_tokens}).total_steps == fast


def test_the_fewer_steps_win_max_steps_or_max_time():
    cfg, cap = budget_plan(max_steps=5)
    p = for_time(cfg, cap, {"seconds": 1.0, "tokens": cap.step_tokens})
    assert p.total_steps == 5 and p.limit == "max_steps" and p.budget["allowed_steps"] > 5
    cfg, cap = budget_plan(max_steps=10_000)
    p = for_time(cfg, cap, {"seconds": 1.0, "tokens": cap.step_tokens})
    assert p.total_steps < 100 and p.limit == "max_time"
    # a budget shorter than one step still trains one
    p = for_time(cfg, cap, {"seconds": 500.0, "tokens": cap.step_tokens})
    assert p.total_steps == 1


def test_replanning_at_the_pace_so_far_keeps_the_warmup_and_the_cap():
    cfg, cap = budget_plan(warmup_ratio=0.2)
    first = for_time(cfg, cap, {"seconds": 1.0, "tokens": cap.step_tokens})
    at = replan_step(first)
    assert at == max(first.warmup_steps, REPLAN_AFTER) and first.warmup_steps > REPLAN_AFTER
    # the steps so far took what the measured one did: the same plan
    same = replan(cfg, first, at, at * 1.0)
    assert (same.total_steps, same.warmup_steps, same.limit) == (first.total_steps, first.warmup_steps, "max_time")
    # twice as long: about half the steps, the warmup already taken unchanged, the decay planned for the new end
    slow = replan(cfg, first, at, at * 2.0)
    assert slow.total_steps == for_time(cfg, cap, {"seconds": 2.0, "tokens": cap.step_tokens}).total_steps
    assert slow.total_steps < first.total_steps and slow.warmup_steps == first.warmup_steps
    assert slow.budget["replanned_at"] == at and slow.budget["paced_step_s"] == pytest.approx(2.0)
    assert slow.epochs == pytest.approx(slow.total_steps * cfg.grad_accum / cap.micro_batches_per_epoch)
    # faster than measured: more steps, never past the cap, whose limit then ends the run
    fast = replan(cfg, first, at, at * 0.001)
    assert fast.total_steps == cap.total_steps and fast.limit == cap.limit == "epochs"
    # a budget already spent still takes the step after this one (the clock ends the run there)
    assert replan(cfg, first, at, 1000.0).total_steps == at + 1


def test_no_replanning_without_a_budget_or_steps_left():
    cfg, cap = budget_plan()
    assert replan_step(cap) is None  # plan() alone: no budget measured
    short = for_time(cfg, cap, {"seconds": 30.0, "tokens": cap.step_tokens})
    assert short.total_steps <= REPLAN_AFTER and replan_step(short) is None


# ------------------------------------------------------------------------------------------ training
def cfg_for(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "data.jsonl", advisor_rows())
    base = dict(base_model=str(model), data=str(data), output_dir=str(tmp_path / "runs"), batch_size=4, grad_accum=1,
                learning_rate=1e-2, sample_every=0, log_every=1, save_every=5, val_fraction=0.1)
    return load_config(None, base | kw)


@pytest.fixture
def fake_time(monkeypatch):
    """A clock that moves only when an optimizer step ends (by `per_step` seconds, or per_step(step) for a
    function), and a measured first step of average size that took `measured` seconds."""
    t = {"now": 0.0, "per_step": 1.0, "measured": 1.0}
    monkeypatch.setattr(recipe, "clock", lambda: t["now"])
    real = recipe.Training.optimizer_step

    def step(self, group):
        out = real(self, group)
        t["now"] += t["per_step"](self.step) if callable(t["per_step"]) else t["per_step"]
        return out

    monkeypatch.setattr(recipe.Training, "optimizer_step", step)
    monkeypatch.setattr(recipe.Training, "measure_step",
                        lambda self: {"seconds": t["measured"], "tokens": self.plan.step_tokens})
    return t


def test_setup_plans_the_schedule_for_the_steps_the_measured_speed_allows(tmp_path, tinyllama_tiny_model, fake_time):
    planned = {}
    for measured in (1.0, 2.0):
        fake_time["measured"] = measured
        said = []
        state = setup(cfg_for(tmp_path, tinyllama_tiny_model, run_name=f"m{measured}", max_time="00:00:00:12"),
                      log=said.append)
        n = planned[measured] = state.plan.total_steps
        assert f"max_time 00:00:00:12 -> {n} steps planned at {measured:.3g} s/step measured" in "\n".join(said)
        assert state.scheduler.lr_lambdas[0](n) == 0.0 < state.scheduler.lr_lambdas[0](n - 1)  # cosine ends at n
        assert read_manifest(state.run_dir)["schedule"]["limit"] == "max_time"
    assert 9 <= planned[1.0] <= 12 and planned[2.0] < planned[1.0] / 2 + 1


def test_max_time_stops_early_with_a_checkpoint_and_resumes(tmp_path, tinyllama_tiny_model, fake_time):
    # measured 1 s a step: 12 s plan ~11 steps, and the first steps keep that pace (the plan stays); then the steps
    # take 3 s each, so the clock stops the run at step 7 (15 s)
    fake_time["per_step"] = lambda step: 1.0 if step <= 3 else 3.0
    said = []
    run = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="cut", max_time="00:00:00:12"), log=said.append)
    m = read_manifest(run)
    planned = m["schedule"]["total_steps"]
    assert 9 <= planned <= 12 and m["schedule"]["limit"] == "max_time" and m["schedule"]["budget"]["replanned_at"] == 3
    assert m["stopped"] == {"reason": "max_time", "step": 7, "planned_steps": planned, "elapsed_s": 15.0}
    assert m["status"] == "complete" and m["metrics"]["steps"] == 7
    assert [c.name for c in checkpoint.checkpoints(run)] == ["step-000005", "step-000007"]
    assert m["last_checkpoint"].endswith("step-000007") and (run / "adapter" / "adapter_model.safetensors").is_file()
    logged = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert logged[-1]["step"] == 7 and logged[-1]["lr"] > 0  # cut mid-decay: the clock ran slower than measured
    assert any("val_loss" in r and r["step"] == 7 for r in read_jsonl(run / "metrics.jsonl"))
    assert any("used up at step 7 of" in line for line in said)

    # --resume (no budget this time) trains the remaining steps of the same schedule, to its end
    resumed = read_manifest(train(cfg_for(tmp_path, tinyllama_tiny_model), resume=run, log=lambda *_: None))
    assert resumed["status"] == "complete" and resumed["schedule"]["total_steps"] == planned
    assert resumed["stopped"]["reason"] == "max_time" and resumed["stopped"]["step"] == planned
    after = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert sorted(after) == list(range(1, planned + 1)) and after[planned]["lr"] == 0.0

    # the same as a run whose steps took the time measured: never cut
    fake_time["per_step"] = 1.0
    straight = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="straight", max_time="00:00:00:12"),
                     log=lambda *_: None)
    s = read_manifest(straight)
    assert s["stopped"] == {"reason": "max_time", "step": planned, "planned_steps": planned,
                            "elapsed_s": float(planned)}
    want = {r["step"]: r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if "loss" in r}
    for step in range(8, planned + 1):
        assert after[step]["loss"] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_measuring_the_first_step_leaves_the_run_as_it_was(tmp_path, tinyllama_tiny_model):
    """The real measurement (no mock): it plans from a positive speed and leaves weights, gradients and RNG as they
    were, so a run with a budget it never reaches trains exactly as one without."""
    kw = dict(max_steps=4, lora_dropout=0.1, save_every=100)
    plain = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="plain", **kw), log=lambda *_: None)
    said = []
    timed = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="timed", max_time={"days": 1}, **kw),
                  log=said.append)
    m = read_manifest(timed)
    budget = m["schedule"]["budget"]
    assert budget["measured_seconds"] > 0 and budget["measured_tokens"] > 0 and budget["allowed_steps"] > 4
    assert m["schedule"]["limit"] == "max_steps" and m["stopped"]["reason"] == "max_steps"
    assert any(line.startswith("max_time 01:00:00:00 -> 4 steps planned") and "max_steps 4 ends the run first" in line
               for line in said)
    a, b = ({r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r} for run in (plain, timed))
    assert a == b and len(a) == 4


def test_steps_slower_than_measured_are_replanned_to_end_within_the_budget(tmp_path, tinyllama_tiny_model,
                                                                            fake_time):
    """The measured step ran fast (1 s) and the run's steps take 2 s: after its first steps the run plans again at
    their pace and ends on its schedule's last step (learning rate 0) inside the budget instead of being cut; a run
    paused after that and resumed goes on with the re-planned steps and learning rates."""
    fake_time["per_step"] = 2.0
    said = []
    run = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="paced", max_time="00:00:00:12"), log=said.append)
    m = read_manifest(run)
    first, b = m["schedule"]["budget"]["allowed_steps"], m["schedule"]["budget"]
    n = m["schedule"]["total_steps"]
    assert b["replanned_at"] == 3 and b["paced_step_s"] == pytest.approx(2.0) and 4 <= n <= 6
    assert m["stopped"] == {"reason": "max_time", "step": n, "planned_steps": n, "elapsed_s": 2.0 * n}
    assert 2.0 * n <= 12 and first == n
    assert any(f"-> {n} steps planned (were " in line and "over the first 3 steps" in line for line in said)
    lrs = {r["step"]: r["lr"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}
    assert sorted(lrs) == list(range(1, n + 1)) and lrs[n] == 0.0 < lrs[n - 1]

    # paused after the re-plan, then resumed: the same steps and learning rates
    fake_time["now"] = 0.0
    cfg = cfg_for(tmp_path, tinyllama_tiny_model, run_name="paused", max_time="00:00:00:12", stop_after_steps=4)
    paused = train(cfg, log=lambda *_: None)
    assert read_manifest(paused)["status"] == "paused"
    done = read_manifest(train(cfg_for(tmp_path, tinyllama_tiny_model), resume=paused, log=lambda *_: None))
    assert done["schedule"]["total_steps"] == n and done["schedule"]["warmup_steps"] == m["schedule"]["warmup_steps"]
    again = {r["step"]: r["lr"] for r in read_jsonl(paused / "metrics.jsonl") if "loss" in r}
    assert again == pytest.approx(lrs)
