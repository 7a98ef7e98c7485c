"""The LoRA fine-tuning recipe, top to bottom: setup, data, plan, model, loop, checkpoint, manifest.

Runs as a plain command or under `accelerate launch` / `torchrun` (DDP through accelerate). Formatting is
chat_format's job and every decision made before the first step is the plan's (train.planner, which check reports
on), a step's model, passes, guards and timing are train.step's, and what the run directory records (data split,
manifest sections, samples, final adapter) is train.record's; this module only moves ids through the model.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm

try:
    import resource
except ImportError:  # Windows
    resource = None

from collegeadvisor import chat_format
from collegeadvisor.chat_format import IGNORE_INDEX
from collegeadvisor.config import Config, duration_text
from collegeadvisor.errors import AdvisorError, TrainingError
from collegeadvisor.models import load_tokenizer, pick_device, resolve_base_model
from collegeadvisor.runs import now, read_manifest, write_manifest
from collegeadvisor.train import checkpoint, record
from collegeadvisor.train.batching import epoch_batches
from collegeadvisor.train.metrics import Metrics, missing_tracker
from collegeadvisor.train.model import LabelLoss, LoraDropout, adapter_digest, keep_base_in_bf16, lora_model
from collegeadvisor.train.planner import (Plan, Rows, autocast_for, cpu_has_bf16, for_time, plan, replan, replan_step,
                                          with_steps)
from collegeadvisor.train.record import prepare_data
from collegeadvisor.train.step import build_model, check_collapse, check_finite, passes_for, sliver, timed

__all__ = ["LabelLoss", "LoraDropout", "Plan", "autocast_for", "cpu_has_bf16", "keep_base_in_bf16", "lora_model",
           "passes_for", "plan", "prepare_data", "setup", "fit", "train"]


def check_parallelism(distributed_type) -> None:
    """Data parallel (DDP, one full copy of the base per process) is what this loop implements. Sharding engines
    need the optimizer prepared with the model and gathered weights for saving, which it does not do yet."""
    name = str(getattr(distributed_type, "value", distributed_type))
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise AdvisorError(f"accelerate config: {name} is not supported by the training recipe yet; use data "
                           "parallel (configs/accelerate/ddp.yaml or torchrun), see docs/scaling.md")


# The clock of the time budget (max_time); tests replace it.
clock = time.monotonic
# Why an invocation ends with the run trained as planned (the others pause it: stop_after_steps, a signal's name).
ENDS = ("max_steps", "epochs", "max_time")


# ----------------------------------------------------------------------------------------------- the recipe
def train(cfg: Config, resume: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Train a LoRA adapter; returns the run directory (manifest status 'complete', or 'paused' with stop_after_steps
    or a signal; manifest["stopped"] says why it stopped)."""
    return fit(setup(cfg, resume, log))


def setup(cfg: Config, resume: str | Path | None = None, log: Callable[[str], None] = print) -> "Training":
    """Everything before the first step: run directory and seeds, data, the plan, model, optimizer, a resumed
    checkpoint, the running manifest. Returns the training state that `fit` runs."""
    run = Training(cfg, resume, log)
    run.prepare()
    return run


def fit(run: "Training") -> Path:
    """The steps of the plan (guards, logging, validation, checkpoints, a pause, the max_time clock), then the final
    adapter and the complete manifest unless the run paused; returns the run directory."""
    if not run.loop():
        run.finish()
    return run.run_dir



def rss_mb() -> float:
    """This process's resident memory now, in MiB (logged with each metrics row: a run's memory over time)."""
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float | None:
    """The most this process has held so far, in MiB (ru_maxrss: the peaks inside steps, which rss_mb, read between
    them, misses), or None where the OS doesn't keep it (Windows)."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux

class Training:
    """The state of one invocation of train() (what `setup` builds and `fit` runs), in the recipe's order: run directory and seeds, data, plan, model, optimizer,
    resume (after the optimizer, so a resumed run continues exactly), manifest; then the loop and the final adapter."""

    def __init__(self, cfg: Config, resume: str | Path | None, log: Callable[[str], None]):
        from accelerate import Accelerator  # accelerate (heavy): only when training starts

        if resume:
            run_dir = Path(resume)
            manifest = read_manifest(run_dir)
            stop_after, max_time = cfg.stop_after_steps, cfg.max_time  # limits of this invocation, not the run's
            cfg = Config.from_manifest(manifest["config"])
            cfg.stop_after_steps, cfg.max_time = stop_after, max_time
        else:
            run_dir, manifest = None, {}  # named below, once every rank can agree on the name
        if missing := missing_tracker(cfg.report_to):
            raise AdvisorError(f"report_to {cfg.report_to}: the package '{missing}' is not installed; pip install "
                               f"'collegeadvisor[{cfg.report_to}]'")
        self.cfg, self.manifest, self.resume = cfg, manifest, bool(resume)
        device = pick_device(cfg.device)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.accelerator = Accelerator(cpu=device == "cpu")
        self.device = str(self.accelerator.device) if device != "mps" else device
        check_parallelism(self.accelerator.distributed_type)
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.run_dir = run_dir or self.new_run_dir()
        self.say = log if self.main else (lambda *_: None)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def new_run_dir(self) -> Path:
        name = self.cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")
        if self.world > 1:  # rank 0's name: ranks may start in different seconds
            from accelerate.utils import broadcast_object_list  # accelerate: see __init__

            name = broadcast_object_list([name])[0]
        run_dir = Path(self.cfg.output_dir) / name
        if (run_dir / "manifest.json").exists():
            raise AdvisorError(f"{run_dir} already holds a run; pick another run_name or --resume {run_dir}")
        self.accelerator.wait_for_everyone()  # every rank has checked before rank 0 writes this run's manifest
        return run_dir

    # ------------------------------------------------------------------------------------------- set-up
    def prepare(self) -> None:
        """Tokenizer and format, data, the plan, model and optimizer, the checkpoint to resume from, the manifest."""
        cfg = self.cfg
        self.resolved = resolve_base_model(cfg.base_model)
        self.tokenizer = load_tokenizer(self.resolved)
        fmt = chat_format.format_spec(self.tokenizer)  # raises on a template that cannot be split or never stops
        if self.resume and fmt["template_sha256"] != self.manifest["format"]["template_sha256"]:
            raise AdvisorError(f"{self.run_dir}: the base model's chat template changed since the run started")
        self.train_rows, self.val_rows, self.val_ex, data_info = prepare_data(cfg, self.tokenizer, self.run_dir)
        if self.resume and data_info["sha256"] != self.manifest["data"]["sha256"]:
            raise AdvisorError(f"{cfg.data}: the data changed since the run started (sha256 differs); start a new run")
        ds = data_info["train"]
        self.say(f"data: {ds['kept']} train / {len(self.val_rows)} val examples; {ds['dropped_too_long']} dropped "
                 f"(answer past max_length {cfg.max_length}), {data_info['duplicates_dropped']} duplicates; tokens "
                 f"p50 {ds['lengths']['p50']} p99 {ds['lengths']['p99']} max {ds['lengths']['max']}")
        rows = Rows(self.train_rows, self.val_rows, data_info["train"], data_info["val"])
        self.plan = plan(cfg, rows, self.device, self.world)
        saved = (self.manifest.get("schedule") or {}) if self.resume else {}
        if saved.get("budget"):  # planned for a time budget at its start: those steps (and that schedule) stay
            self.plan = with_steps(cfg, self.plan, saved["total_steps"], saved["limit"], saved["budget"],
                                   saved.get("warmup_steps"))
        self.build_model()
        self.replan_at = None  # the step after which a run with a time budget plans its steps again (replan)
        if cfg.max_time is not None and not self.resume:
            self.plan_for_time()
            self.replan_at = replan_step(self.plan)
        self.build_schedule()
        self.restore()
        self.write_running_manifest(fmt, data_info)

    def build_model(self) -> None:
        """The base model with LoRA in the plan's precision (train.step.build_model), AdamW and the (DDP-wrapped)
        loss."""
        cfg = self.cfg
        self.model, label_loss, self.autocast = build_model(cfg, self.resolved, self.plan, self.device)
        self.trainable = [w for w in self.model.parameters() if w.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        if cfg.compile:
            (label_loss.decoder or label_loss.model).compile(dynamic=True)
        self.loss_module = self.accelerator.prepare(label_loss)

    def build_schedule(self) -> None:
        """The LR schedule (warmup, then decay) over the plan's steps."""
        from transformers import get_scheduler  # transformers (heavy): only when training starts

        self.scheduler = get_scheduler(self.cfg.lr_scheduler, self.optimizer, num_warmup_steps=self.plan.warmup_steps,
                                       num_training_steps=self.plan.total_steps)

    def plan_for_time(self) -> None:
        """max_time: the steps that fit the budget at the speed of one of this run's steps, measured here (set-up, not
        counted in the budget), and the schedule planned for them."""
        cap = self.plan
        self.plan = for_time(self.cfg, cap, self.measure_step())
        b = self.plan.budget
        line = f"max_time {duration_text(cap.max_time_s)} -> {self.plan.total_steps} steps planned at " \
               f"{b['step_s']:.3g} s/step measured ({b['tokens_per_s']:.0f} tokens/s on a step of the run)"
        if self.plan.limit != "max_time":
            line += f"; {cap.limit} {cap.total_steps} ends the run first (the budget allows {b['allowed_steps']})"
        self.say(line)

    def replan(self, bar) -> None:
        """max_time, after replan_at steps: the steps that fit the budget at the pace of the steps so far, the
        schedule's decay planned for them (the warmup is behind), and the manifest's schedule, so a resumed run keeps
        them. Every rank takes rank 0's plan."""
        before = self.plan
        planned = replan(self.cfg, before, self.step, clock() - self.fit_start)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list  # accelerate: see __init__

            planned = with_steps(self.cfg, before, *broadcast_object_list(
                [(planned.total_steps, planned.limit, planned.budget, planned.warmup_steps)]))
        self.plan, b = planned, planned.budget
        if planned.total_steps != before.total_steps:
            self.rebuild_schedule()
            bar.total = planned.total_steps
            bar.refresh()
        self.say(f"max_time: {b['paced_step_s']:.3g} s/step over the first {self.step} steps (measured before: "
                 f"{b['step_s']:.3g}) -> {planned.total_steps} steps planned (were {before.total_steps})")
        self.manifest["schedule"].update(record.schedule(planned))
        if self.main:
            write_manifest(self.run_dir, self.manifest)

    def rebuild_schedule(self) -> None:
        """The LR schedule for the plan's steps, at the step the run is at (its warmup unchanged, so the learning
        rate goes on from where it is)."""
        self.build_schedule()
        for _ in range(self.step):
            self.scheduler.step()

    def measure_step(self) -> dict:
        """Seconds and padded tokens of the second step's forward and backward passes on this run's model (the
        first holds the longest example: batching.epoch_batches), after a warm-up pass on a sliver (one-time
        set-up); gradients and RNG are left as they were, the weights untouched. Every rank measures (DDP syncs the
        gradients); rank 0's figures count."""
        cfg = self.cfg
        stream = self.micro_stream(cfg.grad_accum if self.plan.total_steps > 1 else 0)
        micro = [next(stream)[1] for _ in range(cfg.grad_accum)]
        group = [self.train_rows[i] for b in micro for i in b]
        tokens = sum(len(b) * max(len(self.train_rows[i]["input_ids"]) for i in b) for b in micro)
        batches = passes_for(group, self.tokenizer.pad_token_id, cfg)
        rng = checkpoint.rng_state()
        self.model.train()
        try:
            self.forward_backward(sliver(batches[0]), 1)
            # the faster of two: the first full-size pass also pays one-time costs (the allocator growing to the
            # step's size), which planned the quickstart's steps 25% short on a 2-core Xeon
            seconds = min(timed(lambda b: self.forward_backward(b, 1), batches, self.device, clock) for _ in range(2))
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            checkpoint.set_rng_state(rng)
        measured = {"seconds": seconds, "tokens": tokens}
        if self.world > 1:  # every rank plans the same steps
            from accelerate.utils import broadcast_object_list  # accelerate: see __init__

            measured = broadcast_object_list([measured])[0]
        return measured

    def restore(self) -> None:
        """Weights, optimizer, scheduler, RNG, position and last losses of the newest intact checkpoint (verified
        sha256, no pickle) when resuming; metrics/samples logs are trimmed to its step."""
        self.step, self.tokens_seen, self.last_ckpt, self.loss, self.last_val = 0, 0, None, None, None
        if not self.resume:
            return
        progress, self.last_ckpt = checkpoint.resume(self.run_dir, self.model, self.optimizer, self.scheduler,
                                                     self.say, self.main)
        if self.last_ckpt:
            self.step, self.tokens_seen = progress["step"], progress["tokens_seen"]
            self.loss, self.last_val = progress.get("loss"), progress.get("val_loss")
            self.say(f"resumed from {self.last_ckpt} at step {self.step}")

    def write_running_manifest(self, fmt: dict, data_info: dict) -> None:
        started = self.manifest.get("started", now())
        self.manifest.update(record.running(self.cfg, self.plan, self.run_dir, self.resolved, fmt, data_info,
                                            self.trainable, self.device, self.world, started))
        if self.main:
            write_manifest(self.run_dir, self.manifest)

    # ------------------------------------------------------------------------------------------- helpers of the loop
    def micro_stream(self, start: int):
        """(epoch, index batch) from micro-batch `start` on: the seeded order of each epoch, this rank's share."""
        cfg, world = self.cfg, self.world
        lengths = [len(r["input_ids"]) for r in self.train_rows]
        epoch, i = divmod(start, self.plan.micro_batches_per_epoch)
        while True:
            batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
            mine = batches[: len(batches) - len(batches) % world][self.rank::world] if world > 1 else batches
            for b in mine[i:]:
                yield epoch, b
            epoch, i = epoch + 1, 0

    def val_loss(self) -> float | None:
        if not self.val_rows:
            return None
        total, count = 0.0, 0
        with torch.no_grad(), self.autocast():
            for batch in passes_for(self.val_rows, self.tokenizer.pad_token_id, self.cfg):
                batch = {k: v.to(self.device) for k, v in batch.items()}
                total += self.loss_module(**batch).item()
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return total / max(count, 1)

    def sample(self, at_step: int) -> None:
        record.samples(self.run_dir, at_step, self.model, self.tokenizer, self.val_ex[: self.cfg.sample_count],
                       self.cfg, self.autocast, self.say)

    def fail(self, exc: BaseException) -> None:
        if self.main:
            self.manifest.update(status="failed", error=str(exc), failed_at_step=self.step)
            with contextlib.suppress(OSError, AdvisorError):  # a full disk: the first error is the one to report
                write_manifest(self.run_dir, self.manifest)

    # ------------------------------------------------------------------------------------------- the loop
    def loop(self) -> bool:
        """Optimizer steps up to the plan's total; True when this invocation pauses first (stop_after_steps, or
        SIGINT/SIGTERM: the step finishes, a checkpoint is saved and the manifest names the signal). A step that ends
        past max_time ends the run there (checkpoint, then the adapter as at the planned end: False)."""
        self.fit_start = clock()  # max_time counts from here: loading and planning were set-up
        cfg, total = self.cfg, self.plan.total_steps
        self.metrics = Metrics(self.run_dir, cfg.report_to, self.main, cfg.model_dump())
        stream = self.micro_stream(self.step * cfg.grad_accum)
        self.model.train()
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=not self.main, dynamic_ncols=True)
        self.start_time, self.start_step, self.start_tokens = time.time(), self.step, self.tokens_seen
        self.window_tokens, self.window_start = 0, time.time()
        self.epoch = (self.step * cfg.grad_accum) // self.plan.micro_batches_per_epoch
        self.stop = checkpoint.StopRequest.install(self.world == 1, self.say)
        reason = None
        try:
            while self.step < self.plan.total_steps:
                group = [self.train_rows[i] for _ in range(cfg.grad_accum) for i in next(stream)[1]]
                self.loss, grad_norm = self.optimizer_step(group)
                bar.update(1)
                if self.step == self.replan_at:
                    self.replan(bar)
                if reason := self.after_step(self.loss, grad_norm, bar):
                    break
            return self.stopped(reason or self.plan.limit)
        except KeyboardInterrupt:
            last = self.last_ckpt
            self.fail(AdvisorError(f"interrupted at step {self.step}; resume from {last}" if last else "interrupted"))
            raise
        except BaseException as exc:
            self.fail(exc)
            raise
        finally:
            self.stop.restore()
            bar.close()
            self.metrics.close()

    def stopped(self, reason: str) -> bool:
        """Why this invocation stopped, in the manifest ("stopped": reason, step, seconds since fit started); True
        when that pauses the run (stop_after_steps, a signal): the paused manifest is written here; otherwise
        finish() writes it with the complete one."""
        cfg, step, total = self.cfg, self.step, self.plan.total_steps
        elapsed = clock() - self.fit_start
        self.manifest["stopped"] = {"reason": reason, "step": step, "planned_steps": total,
                                    "elapsed_s": round(elapsed, 3)}
        if reason == "max_time" and step < total:
            self.say(f"max_time {duration_text(cfg.max_time_s)} used up at step {step} of {total} ({elapsed:.0f} s): "
                     f"checkpoint {self.last_ckpt}; the adapter is this step's; train the remaining steps with: "
                     f"collegeadvisor train --resume {self.run_dir}")
        if reason in ENDS:
            return False
        self.manifest.update(status="paused", stopped_by=self.stop.name)
        if self.main:
            write_manifest(self.run_dir, self.manifest)
        self.say(f"paused at step {step}; continue with: collegeadvisor train --resume {self.run_dir}")
        return True

    def optimizer_step(self, group: list[dict]) -> tuple[float, float]:
        """One optimizer step over a step's examples: forward passes, backward, clipping, the guards, the update."""
        cfg, step = self.cfg, self.step
        batches = passes_for(group, self.tokenizer.pad_token_id, cfg)
        n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_tokens = sum(len(r["input_ids"]) for r in group)
        loss_sum = self.forward_backward(batches, n_labels, step + 1)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm or float("inf")))
        check_finite(grad_norm, "gradient norm", step + 1, self.last_ckpt, cfg)
        loss = loss_sum / max(n_labels, 1)
        check_collapse(loss, grad_norm, step + 1, cfg)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += n_tokens
        self.window_tokens += n_tokens
        return loss, grad_norm

    def forward_backward(self, batches: list[dict], n_labels: int, step: int | None = None) -> float:
        """Forward and backward passes over one step's batches (gradients summed, synced under DDP on the last);
        their summed loss. With `step`, a NaN/Inf loss stops training (check_finite)."""
        loss_sum = 0.0
        for j, batch in enumerate(batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            sync = contextlib.nullcontext() if j == len(batches) - 1 else self.accelerator.no_sync(self.loss_module)
            with sync:
                with self.autocast():
                    part = self.loss_module(**batch)
                if step is not None:
                    check_finite(part.item(), "loss", step, self.last_ckpt, self.cfg)
                self.accelerator.backward(part / max(n_labels, 1))
            loss_sum += part.item()
        return loss_sum

    def stop_reason(self) -> str | None:
        """Why this invocation stops after the step just taken: a signal's name, stop_after_steps, or max_time (the
        step ended past the budget; under DDP when it did on any rank), else None."""
        cfg = self.cfg
        if self.stop.signal:
            return self.stop.name
        if cfg.stop_after_steps is not None and self.step - self.start_step >= cfg.stop_after_steps:
            return "stop_after_steps"
        if cfg.max_time is None:
            return None
        over = clock() - self.fit_start > cfg.max_time_s
        if self.world > 1:  # every rank stops at the same step
            over = bool(self.accelerator.reduce(torch.tensor([float(over)], device=self.device), "sum").item())
        return "max_time" if over else None

    def after_step(self, loss: float, grad_norm: float, bar) -> str | None:
        """Metrics, validation at each epoch's end, samples, checkpoints; the reason this invocation stops here
        (stop_reason: the clock is read at the step's end, before any of these), or None."""
        cfg, step, total, micro = self.cfg, self.step, self.plan.total_steps, self.plan.micro_batches_per_epoch
        epoch_now = (step * cfg.grad_accum) // micro
        reason = self.stop_reason()
        last = step == total or reason == "max_time"  # the run's adapter is this step's: log and validate it
        if step % cfg.log_every == 0 or last:
            elapsed = time.time() - self.window_start
            tps = self.window_tokens * self.world / max(elapsed, 1e-9)
            self.metrics.log({"step": step, "epoch": round(step * cfg.grad_accum / micro, 3), "loss": loss,
                              "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tps,
                              "tokens_seen": self.tokens_seen * self.world, "elapsed_s": time.time() - self.start_time,
                              "rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb()})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
            self.window_tokens, self.window_start = 0, time.time()
        if epoch_now != self.epoch or last:
            self.last_val = self.val_loss()
            if self.last_val is not None:
                self.metrics.log({"step": step, "epoch": round(step * cfg.grad_accum / micro, 3),
                                  "val_loss": self.last_val, "val_ppl": math.exp(min(self.last_val, 50))})
                self.say(f"epoch {epoch_now}: val loss {self.last_val:.4f}")
            self.epoch = epoch_now
        if cfg.sample_every and self.main and (step % cfg.sample_every == 0 or step == total):
            self.sample(step)
        if self.main and (step % cfg.save_every == 0 or (reason and step < total)):
            self.last_ckpt = checkpoint.save(self.run_dir, step, self.model, self.optimizer, self.scheduler,
                                             {"step": step, "tokens_seen": self.tokens_seen, "loss": loss,
                                              "val_loss": self.last_val}, cfg.keep_checkpoints)
            self.manifest["last_checkpoint"] = str(self.last_ckpt)
            write_manifest(self.run_dir, self.manifest)
        return reason if step < total else None

    # ------------------------------------------------------------------------------------------- the end
    def finish(self) -> None:
        """Every rank's adapter equal (data parallel), then the final adapter and the manifest (status complete)."""
        if self.world > 1:  # data parallel: every rank must end with the same adapter
            from accelerate.utils import gather_object  # accelerate: see __init__

            digests = gather_object([adapter_digest(self.model)])
            self.manifest["ranks"] = {"world_size": self.world, "adapter_sha256": digests}
            if len(set(digests)) > 1:
                exc = TrainingError(f"the {self.world} ranks ended with different adapter weights: {digests}")
                self.fail(exc)
                raise exc
        if self.main:
            self.manifest["adapter"] = record.save_adapter(self.run_dir, self.model, self.tokenizer)
            self.write_complete_manifest()
        self.accelerator.wait_for_everyone()

    def write_complete_manifest(self) -> None:
        loss, last_val = self.loss, self.last_val  # a resumed run with no step left: its checkpoint's losses
        elapsed = time.time() - self.start_time
        trained = self.tokens_seen - self.start_tokens if self.step > self.start_step else None
        self.manifest.update(status="complete", finished=now(), error=None, stopped_by=None, metrics=record.metrics(
            loss, last_val, self.step, self.tokens_seen, trained, self.world, elapsed))
        write_manifest(self.run_dir, self.manifest)
        self.say(record.done_line(self.run_dir, loss, last_val))
