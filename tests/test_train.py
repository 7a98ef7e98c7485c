import pytest
import torch

from collegeadvisor.config import load_config
from collegeadvisor.errors import TrainingError
from collegeadvisor.runs import find_run, read_manifest
from collegeadvisor.train import checkpoint, train
from collegeadvisor.train import recipe
from helpers import advisor_rows, read_jsonl, write_jsonl


def cfg_for(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "data.jsonl", advisor_rows())
    base = dict(base_model=str(model), data=str(data), output_dir=str(tmp_path / "runs"), max_steps=20, batch_size=4,
                grad_accum=1, learning_rate=1e-2, sample_every=10, sample_count=2, sample_max_new_tokens=8,
                log_every=1, save_every=5, val_fraction=0.1)
    base.update(kw)
    return load_config(None, base)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def test_twenty_steps_lower_the_loss_and_write_adapter_and_manifest(tmp_path, tiny_model):
    run = train(cfg_for(tmp_path, tiny_model, run_name="r"))
    curve = losses(run)
    assert len(curve) == 20 and sum(list(curve.values())[-3:]) / 3 < sum(list(curve.values())[:3]) / 3 - 0.1
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    m = read_manifest(run)
    assert m["status"] == "complete" and find_run("latest", tmp_path / "runs") == run
    assert m["format"]["chat_template"] and m["format"]["end_of_turn"]["id"] in m["format"]["stop_token_ids"]
    assert m["base_model"]["config_sha256"] and len(m["data"]["sha256"]) == 64
    assert m["config"]["max_length"] == 512 and m["config"]["epochs"] == 3 and m["config"]["max_grad_norm"] == 1.0
    assert m["data"]["train"]["kept"] + m["data"]["val"]["kept"] == 48
    samples = read_jsonl(run / "samples.jsonl")
    assert {s["step"] for s in samples} == {10, 20} and all("reply" in s for s in samples)
    rows = read_jsonl(run / "metrics.jsonl")
    assert any("val_loss" in r for r in rows)
    logged = [r for r in rows if "loss" in r]  # speed and memory over time, beside the loss
    assert all(r["tokens_per_s"] > 0 and r["rss_mb"] > 50 for r in logged)
    peaks = [r["peak_rss_mb"] for r in logged]  # the high-water mark: never below what was held, never falling
    assert all(p >= r["rss_mb"] * 0.99 for p, r in zip(peaks, logged)) and peaks == sorted(peaks)


def test_resume_continues_at_the_same_step_with_the_same_loss(tmp_path, tinyllama_tiny_model):
    straight = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="straight", sample_every=0, lora_dropout=0.1))
    paused = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="paused", sample_every=0, lora_dropout=0.1,
                           stop_after_steps=7))
    assert read_manifest(paused)["status"] == "paused"
    assert [c.name for c in checkpoint.checkpoints(paused)] == ["step-000005", "step-000007"]
    # a reader never sees a half-written checkpoint: no staging folders left behind
    assert not [p for p in (paused / "checkpoints").iterdir() if p.name.startswith(".")]
    cfg = cfg_for(tmp_path, tinyllama_tiny_model)
    resumed = train(cfg, resume=paused)
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 21))
    for step in range(8, 21):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert read_manifest(resumed)["status"] == "complete"


def test_nan_guard_stops_within_one_step_and_keeps_the_checkpoint(tmp_path, tinyllama_tiny_model, monkeypatch):
    real = recipe.LabelLoss.forward
    calls = {"n": 0}

    def poisoned(self, **batch):
        calls["n"] += 1
        out = real(self, **batch)
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(recipe.LabelLoss, "forward", lambda self, **b: poisoned(self, **b))
    cfg = cfg_for(tmp_path, tinyllama_tiny_model, run_name="nan", sample_every=0, save_every=5)
    with pytest.raises(TrainingError, match=r"loss is nan at step 7.*step-000005 is intact"):
        train(cfg)
    run = tmp_path / "runs" / "nan"
    m = read_manifest(run)
    assert m["status"] == "failed" and "nan" in m["error"]
    assert max(losses(run)) == 6  # no step after the NaN was logged
    assert [c.name for c in checkpoint.checkpoints(run)] == ["step-000005"]
    with pytest.raises(Exception, match="not complete"):
        find_run(run)


def test_loss_collapse_with_zero_gradient_is_an_error(tmp_path, tinyllama_tiny_model, monkeypatch):
    def collapsed(self, input_ids, attention_mask, labels):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params[0].sum() * 0.0

    monkeypatch.setattr(recipe.LabelLoss, "forward", collapsed)
    with pytest.raises(TrainingError, match="collapsed"):
        train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="collapse", sample_every=0))


def test_label_only_loss_equals_full_logits_loss(tinyllama_tiny_model, tinyllama_tokenizer):
    from transformers import AutoModelForCausalLM

    from collegeadvisor.chat_format import encode_conversation
    from collegeadvisor.train.batching import collate

    model = AutoModelForCausalLM.from_pretrained(tinyllama_tiny_model, dtype=torch.float32)
    rows = []
    for r in advisor_rows(3):
        enc = encode_conversation(tinyllama_tokenizer, [{"role": "user", "content": r["instruction"]},
                                                        {"role": "assistant", "content": r["output"]}])
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    batch = collate(rows, tinyllama_tokenizer.pad_token_id)
    mine = recipe.LabelLoss(model)(**batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    ref = model(**batch).loss  # transformers' mean over labelled tokens, full logits
    assert float(mine) / n == pytest.approx(float(ref), rel=1e-5)


def test_resume_of_a_run_at_its_last_step_completes_with_the_logged_loss(tmp_path, tinyllama_tiny_model):
    """Interrupted after its last checkpoint (at total_steps) but before the final adapter: the resumed run has no
    step left to train and completes with the losses logged at that step."""
    import json
    import shutil

    run = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="last", max_steps=5, save_every=5, sample_every=0))
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["step"] == 5]
    m = read_manifest(run)
    (run / "manifest.json").write_text(json.dumps(m | {"status": "failed", "error": "killed", "metrics": None}))
    shutil.rmtree(run / "adapter")
    resumed = read_manifest(train(cfg_for(tmp_path, tinyllama_tiny_model), resume=run))
    assert resumed["status"] == "complete" and resumed["metrics"]["steps"] == 5
    assert resumed["metrics"]["final_loss"] == next(r["loss"] for r in rows if "loss" in r)
    assert resumed["metrics"]["val_loss"] == next(r["val_loss"] for r in rows if "val_loss" in r)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_report_to_tensorboard_sends_what_metrics_jsonl_holds(tmp_path, tinyllama_tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(cfg_for(tmp_path, tinyllama_tiny_model, run_name="tb", max_steps=4, sample_every=0,
                        report_to="tensorboard"))
    rows = read_jsonl(run / "metrics.jsonl")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for tag in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"):
        want = [(r["step"], r[tag]) for r in rows if tag in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert want and [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), tag


def test_report_to_a_tracker_that_is_not_installed_is_one_line_before_training(tmp_path, tinyllama_tiny_model,
                                                                                monkeypatch):
    from collegeadvisor import check
    from collegeadvisor.errors import AdvisorError
    from collegeadvisor.train import metrics

    monkeypatch.setattr(metrics, "find_spec", lambda name: None)
    cfg = cfg_for(tmp_path, tinyllama_tiny_model, run_name="nowandb", report_to="wandb")
    with pytest.raises(AdvisorError, match=r"report_to wandb: the package 'wandb' is not installed; pip install "
                                           r"'collegeadvisor\[wandb\]'"):
        train(cfg)
    assert not (tmp_path / "runs" / "nowandb").exists()
    monkeypatch.setattr(check.environment, "find_spec", lambda name: None)
    f = next(f for f in check.run_checks(cfg, measure=False, stages=()) if f.where == "report_to")
    assert f.level == "error" and f.fix == "pip install 'collegeadvisor[wandb]'"


def test_setup_then_fit_is_train(tmp_path, tinyllama_tiny_model):
    from collegeadvisor.train import fit, setup
    from test_speed_paths import cfg_for, step_losses

    cfg = cfg_for(tmp_path, tinyllama_tiny_model, max_steps=2)
    state = setup(cfg, log=lambda *_: None)
    assert state.step == 0 and state.plan.total_steps == 2  # set up, nothing run yet
    run_dir = fit(state)
    assert len(step_losses(run_dir)) == 2


def test_the_batch_with_the_longest_example_leads_each_epoch_when_grouped_by_length():
    """With group_by_length, batches are shuffled, but the one holding the longest example goes first (as
    transformers' LengthGroupedSampler does): the run meets its largest pass, and its peak memory, at step 1. The
    order is the seed's, the same on every call (resume, ranks), and each epoch's own."""
    import random

    from collegeadvisor.train.batching import epoch_batches

    rng = random.Random(7)
    lengths = [rng.randint(20, 600) for _ in range(203)]
    for epoch in range(3):
        batches = epoch_batches(lengths, 4, seed=11, epoch=epoch, group_by_length=True)
        assert max(lengths[i] for i in batches[0]) == max(lengths)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert batches == epoch_batches(lengths, 4, seed=11, epoch=epoch, group_by_length=True)
    firsts = [epoch_batches(lengths, 4, 11, e, True)[1] for e in range(3)]
    assert firsts[0] != firsts[1] != firsts[2]  # the rest still shuffled per epoch
    plain = epoch_batches(lengths, 4, seed=11, epoch=0, group_by_length=False)
    assert sorted(i for b in plain for i in b) == list(range(len(lengths)))
