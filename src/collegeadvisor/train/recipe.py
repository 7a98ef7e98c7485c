"""The LoRA fine-tuning recipe, top to bottom: setup, data, plan, model, loop, checkpoint, manifest.

Runs as a plain command or under `accelerate launch` / `torchrun` (DDP through accelerate). Formatting is
chat_format's job and every decision made before the first step is the plan's (train.planner, which check reports
on); this module only moves ids through the model.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from collegeadvisor import chat_format
from collegeadvisor.chat_format import IGNORE_INDEX
from collegeadvisor.config import Config
from collegeadvisor.data.loaders import load_examples, train_val
from collegeadvisor.fsutil import file_sha256
from collegeadvisor.data.scorecard_qa import retrieval_spec
from collegeadvisor.errors import AdvisorError, TrainingError
from collegeadvisor.fsutil import append_jsonl, atomic_replace_dir, atomic_write_jsonl, staging_dir
from collegeadvisor.generate import answer
from collegeadvisor.integrity import file_hashes
from collegeadvisor.models import base_fingerprint, load_model, load_tokenizer, pick_device, resolve_base_model
from collegeadvisor.runs import now, package_versions, read_manifest, write_manifest
from collegeadvisor.train import checkpoint
from collegeadvisor.train.batching import epoch_batches, forward_batches
from collegeadvisor.train.metrics import Metrics, missing_tracker
from collegeadvisor.train.model import LabelLoss, LoraDropout, adapter_digest, keep_base_in_bf16, lora_model
from collegeadvisor.train.planner import (Plan, Rows, autocast_context, autocast_for, cpu_has_bf16, encode, pass_tokens,
                                          plan)

__all__ = ["LabelLoss", "LoraDropout", "Plan", "autocast_for", "cpu_has_bf16", "keep_base_in_bf16", "lora_model",
           "passes_for", "plan", "prepare_data", "setup", "fit", "train"]


def check_parallelism(distributed_type) -> None:
    """Data parallel (DDP, one full copy of the base per process) is what this loop implements. Sharding engines
    need the optimizer prepared with the model and gathered weights for saving, which it does not do yet."""
    name = str(getattr(distributed_type, "value", distributed_type))
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise AdvisorError(f"accelerate config: {name} is not supported by the training recipe yet; use data "
                           "parallel (configs/accelerate/ddp.yaml or torchrun), see docs/scaling.md")


def passes_for(rows: list[dict], pad_id: int, cfg: Config) -> list[dict]:
    return forward_batches(rows, pad_id, pass_tokens(cfg), cfg.packing, cfg.max_length)


# ----------------------------------------------------------------------------------------------- guards
def check_finite(value: float, what: str, step: int, last_ckpt: Path | None, cfg: Config) -> None:
    if math.isfinite(value):
        return
    hint = "fp16 overflows: use fp32 or bf16" if cfg.dtype in ("fp16", "float16") else f"lower learning_rate ({cfg.learning_rate})"
    kept = f"last checkpoint {last_ckpt} is intact" if last_ckpt else "no checkpoint was written yet"
    raise TrainingError(f"{what} is {value} at step {step}: training stopped before the update; {kept}; {hint}")


def check_collapse(loss: float, grad_norm: float, step: int, cfg: Config) -> None:
    if loss < cfg.collapse_loss and (grad_norm == 0 or not math.isfinite(grad_norm)):
        raise TrainingError(
            f"loss collapsed to {loss:.2e} with grad norm {grad_norm} at step {step}: the model is not learning "
            "(all labels masked, or NaN on MPS/fp16); this is a failure, not convergence"
        )


# ----------------------------------------------------------------------------------------------- data
def prepare_data(cfg: Config, tokenizer, run_dir: Path) -> tuple[list[dict], list[dict], list[dict], dict]:
    if not cfg.data:
        raise AdvisorError("setting 'data': no training data given (--data FILE, or `collegeadvisor data scorecard`)")
    examples, _ = load_examples(cfg.data)
    val_given = load_examples(cfg.val_data)[0] if cfg.val_data else None
    train_ex, val_ex, n_dupes = train_val(examples, val_given, cfg.val_fraction, cfg.seed, cfg.max_examples)
    rows = encode(cfg, tokenizer, train_ex, val_ex)
    if not rows.train:
        raise AdvisorError(f"{cfg.data}: no example fits max_length {cfg.max_length}; raise max_length")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", train_ex)
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", val_ex)
    info = {
        "path": str(Path(cfg.data).resolve()), "sha256": file_sha256(cfg.data),
        "val_path": str(Path(cfg.val_data).resolve()) if cfg.val_data else None,
        "duplicates_dropped": n_dupes, "train": rows.train_stats, "val": rows.val_stats,
        "context_k": max((len(ex.get("context") or []) for ex in train_ex), default=0),
    }
    return rows.train, rows.val, val_ex, info



# ----------------------------------------------------------------------------------------------- the recipe
def train(cfg: Config, resume: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Train a LoRA adapter; returns the run directory (manifest status 'complete', or 'paused' with stop_after_steps)."""
    return fit(setup(cfg, resume, log))


def setup(cfg: Config, resume: str | Path | None = None, log: Callable[[str], None] = print) -> "Training":
    """Everything before the first step: run directory and seeds, data, the plan, model, optimizer, a resumed
    checkpoint, the running manifest. Returns the training state that `fit` runs."""
    run = Training(cfg, resume, log)
    run.prepare()
    return run


def fit(run: "Training") -> Path:
    """The steps of the plan (guards, logging, validation, checkpoints, a pause), then the final adapter and the
    complete manifest unless the run paused; returns the run directory."""
    if not run.loop():
        run.finish()
    return run.run_dir


class Training:
    """The state of one invocation of train() (what `setup` builds and `fit` runs), in the recipe's order: run directory and seeds, data, plan, model, optimizer,
    resume (after the optimizer, so a resumed run continues exactly), manifest; then the loop and the final adapter."""

    def __init__(self, cfg: Config, resume: str | Path | None, log: Callable[[str], None]):
        from accelerate import Accelerator

        if resume:
            run_dir = Path(resume)
            manifest = read_manifest(run_dir)
            stop_after = cfg.stop_after_steps
            cfg = Config.from_manifest(manifest["config"])
            cfg.stop_after_steps = stop_after
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
            from accelerate.utils import broadcast_object_list

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
        self.build_model()
        self.restore()
        self.write_running_manifest(fmt, data_info)

    def build_model(self) -> None:
        """The base model with LoRA in the plan's precision, AdamW, the LR schedule and the (DDP-wrapped) loss."""
        from transformers import get_scheduler

        cfg, p = self.cfg, self.plan
        self.model = lora_model(load_model(self.resolved, dtype=p.dtype, device=self.device), cfg)
        self.autocast = autocast_context(self.device, p.autocast)
        if p.base_bf16:
            keep_base_in_bf16(self.model)
        self.trainable = [w for w in self.model.parameters() if w.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=p.warmup_steps,
                                       num_training_steps=p.total_steps)
        label_loss = LabelLoss(self.model, fused=cfg.fused)
        if cfg.compile:
            (label_loss.decoder or label_loss.model).compile(dynamic=True)
        self.loss_module = self.accelerator.prepare(label_loss)

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
        cfg, p = self.cfg, self.plan
        self.manifest.update({
            "status": "running", "run_dir": str(self.run_dir.resolve()), "started": self.manifest.get("started", now()),
            "config": cfg.model_dump(),
            "base_model": base_fingerprint(cfg.base_model, self.resolved),
            "format": fmt, "max_length": cfg.max_length,
            "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "target": cfg.lora_target,
                     "trainable_params": sum(w.numel() for w in self.trainable)},
            "data": data_info, "versions": package_versions(),
            "retrieval": retrieval_spec(data_info["context_k"]) if data_info["context_k"] else None,
            "device": self.device, "dtype": str(p.dtype).replace("torch.", ""), "world_size": self.world,
            "autocast_bf16": p.autocast, "base_bf16": p.base_bf16,
            "forward_passes": {"packing": cfg.packing, "max_tokens": p.tokens_per_pass, "compile": cfg.compile,
                               "threads": torch.get_num_threads()},
            "schedule": {"total_steps": p.total_steps, "micro_batches_per_epoch": p.micro_batches_per_epoch,
                         "effective_batch": p.effective_batch},
        })
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
        cfg = self.cfg
        chosen = self.val_ex[: cfg.sample_count]
        if not chosen:
            return
        prompts = [ex["messages"][:-1] for ex in chosen]
        with self.autocast():
            replies = answer(self.model, self.tokenizer, prompts, [ex.get("context") for ex in chosen], retries=0,
                             max_new_tokens=cfg.sample_max_new_tokens, batch_size=cfg.eval_batch_size)
        rows = [{"step": at_step, "question": p[-1]["content"], "reference": ex["messages"][-1]["content"],
                 "reply": r["text"], "stopped_at_eos": r["stopped"], "n_tokens": r["n_tokens"],
                 "grounding": (r["grounding"] or {}).get("status")}
                for p, ex, r in zip(prompts, chosen, replies)]
        append_jsonl(self.run_dir / "samples.jsonl", rows)
        for r in rows:
            self.say(f"  [step {at_step}] Q: {r['question'][:90]}\n      A: {r['reply'][:200]!r}"
                     f"{'' if r['stopped_at_eos'] else ' (no end-of-turn)'}")

    def fail(self, exc: BaseException) -> None:
        if self.main:
            self.manifest.update(status="failed", error=str(exc), failed_at_step=self.step)
            with contextlib.suppress(OSError, AdvisorError):  # a full disk: the first error is the one to report
                write_manifest(self.run_dir, self.manifest)

    # ------------------------------------------------------------------------------------------- the loop
    def loop(self) -> bool:
        """Optimizer steps up to the plan's total; True when this invocation pauses first (stop_after_steps, or
        SIGINT/SIGTERM: the step finishes, a checkpoint is saved and the manifest names the signal)."""
        from tqdm.auto import tqdm

        cfg, total = self.cfg, self.plan.total_steps
        self.metrics = Metrics(self.run_dir, cfg.report_to, self.main, cfg.model_dump())
        stream = self.micro_stream(self.step * cfg.grad_accum)
        self.model.train()
        bar = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=not self.main, dynamic_ncols=True)
        self.start_time, self.start_step, self.start_tokens = time.time(), self.step, self.tokens_seen
        self.window_tokens, self.window_start = 0, time.time()
        self.epoch = (self.step * cfg.grad_accum) // self.plan.micro_batches_per_epoch
        self.stop = checkpoint.StopRequest.install(self.world == 1, self.say)
        try:
            while self.step < total:
                group = [self.train_rows[i] for _ in range(cfg.grad_accum) for i in next(stream)[1]]
                self.loss, grad_norm = self.optimizer_step(group)
                bar.update(1)
                if self.after_step(self.loss, grad_norm, bar):
                    return True
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
        return False

    def optimizer_step(self, group: list[dict]) -> tuple[float, float]:
        """One optimizer step over a step's examples: forward passes, backward, clipping, the guards, the update."""
        cfg, step = self.cfg, self.step
        batches = passes_for(group, self.tokenizer.pad_token_id, cfg)
        n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_tokens = sum(len(r["input_ids"]) for r in group)
        loss_sum = 0.0
        for j, batch in enumerate(batches):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            sync = contextlib.nullcontext() if j == len(batches) - 1 else self.accelerator.no_sync(self.loss_module)
            with sync:
                with self.autocast():
                    part = self.loss_module(**batch)
                check_finite(part.item(), "loss", step + 1, self.last_ckpt, cfg)
                self.accelerator.backward(part / max(n_labels, 1))
            loss_sum += part.item()
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

    def after_step(self, loss: float, grad_norm: float, bar) -> bool:
        """Metrics, validation at each epoch's end, samples, checkpoints; True when this invocation pauses here."""
        cfg, step, total, micro = self.cfg, self.step, self.plan.total_steps, self.plan.micro_batches_per_epoch
        epoch_now = (step * cfg.grad_accum) // micro
        if step % cfg.log_every == 0 or step == total:
            elapsed = time.time() - self.window_start
            tps = self.window_tokens * self.world / max(elapsed, 1e-9)
            self.metrics.log({"step": step, "epoch": round(step * cfg.grad_accum / micro, 3), "loss": loss,
                              "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tps,
                              "tokens_seen": self.tokens_seen * self.world, "elapsed_s": time.time() - self.start_time})
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
            self.window_tokens, self.window_start = 0, time.time()
        if epoch_now != self.epoch or step == total:
            self.last_val = self.val_loss()
            if self.last_val is not None:
                self.metrics.log({"step": step, "epoch": round(step * cfg.grad_accum / micro, 3),
                                  "val_loss": self.last_val, "val_ppl": math.exp(min(self.last_val, 50))})
                self.say(f"epoch {epoch_now}: val loss {self.last_val:.4f}")
            self.epoch = epoch_now
        if cfg.sample_every and self.main and (step % cfg.sample_every == 0 or step == total):
            self.sample(step)
        stopping = (cfg.stop_after_steps is not None and step - self.start_step >= cfg.stop_after_steps) or bool(
            self.stop.signal)
        if self.main and (step % cfg.save_every == 0 or (stopping and step < total)):
            self.last_ckpt = checkpoint.save(self.run_dir, step, self.model, self.optimizer, self.scheduler,
                                             {"step": step, "tokens_seen": self.tokens_seen, "loss": loss,
                                              "val_loss": self.last_val}, cfg.keep_checkpoints)
            self.manifest["last_checkpoint"] = str(self.last_ckpt)
            write_manifest(self.run_dir, self.manifest)
        if stopping and step < total:
            self.manifest.update(status="paused", stopped_by=self.stop.name)
            if self.main:
                write_manifest(self.run_dir, self.manifest)
            self.say(f"paused at step {step}; continue with: collegeadvisor train --resume {self.run_dir}")
            return True
        return False

    # ------------------------------------------------------------------------------------------- the end
    def finish(self) -> None:
        """Every rank's adapter equal (data parallel), then the final adapter and the manifest (status complete)."""
        if self.world > 1:  # data parallel: every rank must end with the same adapter
            from accelerate.utils import gather_object

            digests = gather_object([adapter_digest(self.model)])
            self.manifest["ranks"] = {"world_size": self.world, "adapter_sha256": digests}
            if len(set(digests)) > 1:
                exc = TrainingError(f"the {self.world} ranks ended with different adapter weights: {digests}")
                self.fail(exc)
                raise exc
        if self.main:
            final = self.run_dir / "adapter"
            stage = staging_dir(final)
            self.model.save_pretrained(stage)
            self.tokenizer.save_pretrained(stage)
            atomic_replace_dir(stage, final)
            self.manifest["adapter"] = {"files": file_hashes(final)}  # load_run refuses an adapter changed after this
            self.write_complete_manifest()
        self.accelerator.wait_for_everyone()

    def write_complete_manifest(self) -> None:
        loss, last_val = self.loss, self.last_val  # a resumed run with no step left: its checkpoint's losses
        elapsed = time.time() - self.start_time
        step, world = self.step, self.world
        self.manifest.update(status="complete", finished=now(), error=None, stopped_by=None, metrics={
            "final_loss": loss, "val_loss": last_val,
            "val_ppl": math.exp(min(last_val, 50)) if last_val is not None else None,
            "steps": step, "tokens_seen": self.tokens_seen * world, "train_seconds": elapsed,
            "tokens_per_s": (self.tokens_seen - self.start_tokens) * world / max(elapsed, 1e-9)
            if step > self.start_step else None,
        })
        write_manifest(self.run_dir, self.manifest)
        said = f"loss {loss:.4f}" if loss is not None else "no loss logged"
        self.say(f"done: {self.run_dir} ({said}" + (f", val loss {last_val:.4f})" if last_val is not None else ")"))
