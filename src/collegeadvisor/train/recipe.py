"""The LoRA fine-tuning recipe, top to bottom: setup, data, model, loop, checkpoint, manifest.

Runs as a plain command or under `accelerate launch` / `torchrun` (DDP through accelerate). Formatting is
chat_format's job; this module only moves ids through the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from collegeadvisor import chat_format
from collegeadvisor.chat_format import IGNORE_INDEX
from collegeadvisor.config import Config
from collegeadvisor.data.loaders import file_sha256, load_examples, train_val
from collegeadvisor.data.prepare import conversation, encode_examples
from collegeadvisor.errors import AdvisorError, TrainingError
from collegeadvisor.fsutil import append_jsonl, atomic_replace_dir, atomic_write_jsonl, staging_dir
from collegeadvisor.generate import generate
from collegeadvisor.integrity import file_hashes
from collegeadvisor.models import base_fingerprint, load_model, load_tokenizer, pick_device, pick_dtype, resolve_base_model
from collegeadvisor.runs import now, package_versions, read_manifest, write_manifest
from collegeadvisor.train import checkpoint
from collegeadvisor.train.batching import epoch_batches, forward_batches


# ----------------------------------------------------------------------------------------------- loss
class LabelLoss(torch.nn.Module):
    """Sum of token cross-entropy at labelled positions only: the output layer (49k vocabulary for SmolLM2) runs
    on assistant tokens, not on every prompt token. Wrapping it as a module keeps DDP's gradient hooks intact."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        causal = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = causal.config
        plain = getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
        self.decoder = causal.get_decoder() if plain and hasattr(causal, "get_decoder") else None
        self.head = causal.get_output_embeddings() if self.decoder is not None else None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        """Packed rows (batching.collate_packed) come with position_ids and no attention_mask; use_cache=False
        is what keeps their examples apart."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if self.decoder is None:  # models that post-process logits: full forward
            logits = self.model(**inputs).logits[:, :-1]
            return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
        hidden = self.decoder(**inputs).last_hidden_state
        logits = self.head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_for(device: str, dtype: torch.dtype, setting: str):
    """bf16 autocast where the hardware runs bf16 matmuls fast; master and LoRA weights stay in their dtype."""
    if setting == "off" or dtype != torch.float32:
        return contextlib.nullcontext
    if device == "cpu" and (setting == "on" or cpu_has_bf16()):
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if device.startswith("cuda") and (setting == "on" or torch.cuda.is_bf16_supported()):
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def keep_base_in_bf16(model) -> None:
    """Frozen base weights stored in bf16 (half the memory, and autocast no longer re-casts every fp32 weight on
    every pass); LoRA weights stay fp32. Under autocast, peft is told not to up-cast each LoRA input to fp32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False


class LoraDropout(torch.nn.Module):
    """Dropout on each LoRA layer's input, with its mask drawn 4 positions per random number: torch's dropout draws
    one number per position on the CPU (one serial Mersenne-Twister call each: ~20% of a LoRA step on 2 cores);
    here each 64-bit draw gives four uniform 16-bit words, compared with p (p rounded to 1/65536). Same
    distribution, the global torch generator (so seeds and resume hold), a bool mask kept for backward."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = words.view(torch.int16)[:n].view(x.shape) >= round(self.p * 65536) - 32768
        return x.mul(keep).mul_(1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lora_model(model, cfg: Config):
    """The base model with LoRA adapters as cfg sets them (r, alpha, dropout, target layers), LoRA weights in fp32
    even over a bf16 base, and LoRA dropout drawn by LoraDropout. Train and check build it here."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if cfg.lora_target == "all-linear" else [t.strip() for t in cfg.lora_target.split(",")]
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in fp32 even over a bf16 base
    for m in model.modules():
        drops = getattr(m, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, d in list(drops.items()):
                if isinstance(d, torch.nn.Dropout) and d.p > 0:
                    drops[name] = LoraDropout(d.p)
    return model


def adapter_digest(model) -> str:
    """sha256 of the trainable weights, in name order: equal on every rank of a healthy data-parallel run."""
    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_parallelism(distributed_type) -> None:
    """Data parallel (DDP, one full copy of the base per process) is what this loop implements. Sharding engines
    need the optimizer prepared with the model and gathered weights for saving, which it does not do yet."""
    name = str(getattr(distributed_type, "value", distributed_type))
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise AdvisorError(f"accelerate config: {name} is not supported by the training recipe yet; use data "
                           "parallel (configs/accelerate/ddp.yaml or torchrun), see docs/scaling.md")


def passes_for(rows: list[dict], pad_id: int, cfg: Config) -> list[dict]:
    return forward_batches(rows, pad_id, cfg.batch_tokens or cfg.batch_size * cfg.max_length, cfg.packing,
                           cfg.max_length)


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
    train_rows, train_stats = encode_examples(tokenizer, train_ex, cfg.max_length, cfg.truncation, cfg.data)
    val_rows, val_stats = encode_examples(tokenizer, val_ex, cfg.max_length, "truncate", cfg.val_data or cfg.data)
    if not train_rows:
        raise AdvisorError(f"{cfg.data}: no example fits max_length {cfg.max_length}; raise max_length")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", train_ex)
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", val_ex)
    info = {
        "path": str(Path(cfg.data).resolve()), "sha256": file_sha256(cfg.data),
        "val_path": str(Path(cfg.val_data).resolve()) if cfg.val_data else None,
        "duplicates_dropped": n_dupes, "train": train_stats, "val": val_stats,
    }
    return train_rows, val_rows, val_ex, info


# ----------------------------------------------------------------------------------------------- the recipe
def train(cfg: Config, resume: str | Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Train a LoRA adapter; returns the run directory (manifest status 'complete', or 'paused' with stop_after_steps)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    # --- setup
    if resume:
        run_dir = Path(resume)
        manifest = read_manifest(run_dir)
        stop_after = cfg.stop_after_steps
        cfg = Config(**manifest["config"])
        cfg.stop_after_steps = stop_after
    else:
        run_dir, manifest = None, {}  # named below, once every rank can agree on the name
    device = pick_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    accelerator = Accelerator(cpu=device == "cpu")
    device = str(accelerator.device) if device != "mps" else device
    check_parallelism(accelerator.distributed_type)
    main = accelerator.is_main_process
    if run_dir is None:
        name = cfg.run_name or time.strftime("run-%Y%m%d-%H%M%S")
        if accelerator.num_processes > 1:  # rank 0's name: ranks may start in different seconds
            from accelerate.utils import broadcast_object_list

            name = broadcast_object_list([name])[0]
        run_dir = Path(cfg.output_dir) / name
        if (run_dir / "manifest.json").exists():
            raise AdvisorError(f"{run_dir} already holds a run; pick another run_name or --resume {run_dir}")
        accelerator.wait_for_everyone()  # every rank has checked before rank 0 writes this run's manifest
    say = log if main else (lambda *_: None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)

    # --- tokenizer, format, data
    resolved = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(resolved)
    fmt = chat_format.format_spec(tokenizer)  # raises on a template that cannot be split or never stops
    if resume and fmt["template_sha256"] != manifest["format"]["template_sha256"]:
        raise AdvisorError(f"{run_dir}: the base model's chat template changed since the run started")
    train_rows, val_rows, val_ex, data_info = prepare_data(cfg, tokenizer, run_dir)
    if resume and data_info["sha256"] != manifest["data"]["sha256"]:
        raise AdvisorError(f"{cfg.data}: the data changed since the run started (sha256 differs); start a new run")
    ds = data_info["train"]
    say(f"data: {ds['kept']} train / {len(val_rows)} val examples; {ds['dropped_too_long']} dropped (answer past "
        f"max_length {cfg.max_length}), {data_info['duplicates_dropped']} duplicates; tokens p50 {ds['lengths']['p50']} "
        f"p99 {ds['lengths']['p99']} max {ds['lengths']['max']}")

    # --- model and LoRA
    dtype = pick_dtype(device, cfg.dtype)
    model = load_model(resolved, dtype=dtype, device=device)
    model = lora_model(model, cfg)
    autocast = autocast_for(device, dtype, cfg.autocast_bf16)
    base_bf16 = dtype == torch.float32 and (cfg.base_bf16 == "on" or (
        cfg.base_bf16 == "auto" and autocast is not contextlib.nullcontext))
    if base_bf16:
        keep_base_in_bf16(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)

    # --- schedule
    world, rank = accelerator.num_processes, accelerator.process_index
    lengths = [len(r["input_ids"]) for r in train_rows]
    global_batches = math.ceil(len(train_rows) / cfg.batch_size)
    micro_per_epoch = max(1, global_batches // world)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    label_loss = LabelLoss(model)
    if cfg.compile:
        (label_loss.decoder or label_loss.model).compile(dynamic=True)
    loss_module = accelerator.prepare(label_loss)

    # --- manifest (status running) and resume
    step, tokens_seen, last_ckpt, loss, last_val = 0, 0, None, None, None
    if resume:  # the newest intact checkpoint (verified sha256, no pickle); metrics/samples trimmed to its step
        progress, last_ckpt = checkpoint.resume(run_dir, model, optimizer, scheduler, say, main)
        if last_ckpt:
            step, tokens_seen = progress["step"], progress["tokens_seen"]
            loss, last_val = progress.get("loss"), progress.get("val_loss")
            say(f"resumed from {last_ckpt} at step {step}")
    manifest.update({
        "status": "running", "run_dir": str(run_dir.resolve()), "started": manifest.get("started", now()),
        "config": cfg.model_dump(),
        "base_model": base_fingerprint(cfg.base_model, resolved),
        "format": fmt, "max_length": cfg.max_length,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "target": cfg.lora_target,
                 "trainable_params": n_trainable},
        "data": data_info, "versions": package_versions(),
        "device": device, "dtype": str(dtype).replace("torch.", ""), "world_size": world,
        "autocast_bf16": autocast is not contextlib.nullcontext, "base_bf16": base_bf16,
        "forward_passes": {"packing": cfg.packing, "max_tokens": cfg.batch_tokens or cfg.batch_size * cfg.max_length,
                           "compile": cfg.compile, "threads": torch.get_num_threads()},
        "schedule": {"total_steps": total_steps, "micro_batches_per_epoch": micro_per_epoch,
                     "effective_batch": cfg.batch_size * cfg.grad_accum * world},
    })
    if main:
        write_manifest(run_dir, manifest)

    def micro_stream(start: int):
        epoch, i = divmod(start, micro_per_epoch)
        while True:
            batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
            mine = batches[: len(batches) - len(batches) % world][rank::world] if world > 1 else batches
            for b in mine[i:]:
                yield epoch, b
            epoch, i = epoch + 1, 0

    def val_loss() -> float | None:
        if not val_rows:
            return None
        total, count = 0.0, 0
        with torch.no_grad(), autocast():
            for batch in passes_for(val_rows, tokenizer.pad_token_id, cfg):
                batch = {k: v.to(device) for k, v in batch.items()}
                total += loss_module(**batch).item()
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return total / max(count, 1)

    def sample(at_step: int) -> None:
        chosen = val_ex[: cfg.sample_count]
        if not chosen:
            return
        prompts = [conversation(ex)[:-1] for ex in chosen]
        with autocast():
            replies = generate(model, tokenizer, prompts, max_new_tokens=cfg.sample_max_new_tokens,
                               batch_size=cfg.eval_batch_size)
        rows = [{"step": at_step, "question": p[-1]["content"], "reference": ex["messages"][-1]["content"],
                 "reply": r["text"], "stopped_at_eos": r["stopped"], "n_tokens": r["n_tokens"]}
                for p, ex, r in zip(prompts, chosen, replies)]
        append_jsonl(run_dir / "samples.jsonl", rows)
        for r in rows:
            say(f"  [step {at_step}] Q: {r['question'][:90]}\n      A: {r['reply'][:200]!r}"
                f"{'' if r['stopped_at_eos'] else ' (no end-of-turn)'}")

    def log_metrics(row: dict) -> None:
        if main:
            append_jsonl(run_dir / "metrics.jsonl", [row])

    def fail(exc: BaseException) -> None:
        if main:
            manifest.update(status="failed", error=str(exc), failed_at_step=step)
            with contextlib.suppress(OSError, AdvisorError):  # a full disk: the first error is the one to report
                write_manifest(run_dir, manifest)

    # --- the loop
    stream = micro_stream(step * cfg.grad_accum)
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not main, dynamic_ncols=True)
    start_time, start_step, start_tokens = time.time(), step, tokens_seen
    window_tokens, window_start = 0, time.time()
    epoch = (step * cfg.grad_accum) // micro_per_epoch
    stop = checkpoint.StopRequest.install(world == 1, say)  # SIGINT/SIGTERM: finish the step, checkpoint, exit
    try:
        while step < total_steps:
            group = [train_rows[i] for _ in range(cfg.grad_accum) for i in next(stream)[1]]
            batches = passes_for(group, tokenizer.pad_token_id, cfg)
            n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            n_tokens = sum(len(r["input_ids"]) for r in group)
            loss_sum = 0.0
            for j, batch in enumerate(batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                sync = contextlib.nullcontext() if j == len(batches) - 1 else accelerator.no_sync(loss_module)
                with sync:
                    with autocast():
                        part = loss_module(**batch)
                    check_finite(part.item(), "loss", step + 1, last_ckpt, cfg)
                    accelerator.backward(part / max(n_labels, 1))
                loss_sum += part.item()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
            check_finite(grad_norm, "gradient norm", step + 1, last_ckpt, cfg)
            loss = loss_sum / max(n_labels, 1)
            check_collapse(loss, grad_norm, step + 1, cfg)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += n_tokens
            window_tokens += n_tokens
            now_epoch = (step * cfg.grad_accum) // micro_per_epoch
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.time() - window_start
                tps = window_tokens * world / max(elapsed, 1e-9)
                log_metrics({"step": step, "epoch": round(step * cfg.grad_accum / micro_per_epoch, 3), "loss": loss,
                             "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "tokens_per_s": tps,
                             "tokens_seen": tokens_seen * world, "elapsed_s": time.time() - start_time})
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}")
                window_tokens, window_start = 0, time.time()
            if now_epoch != epoch or step == total_steps:
                last_val = val_loss()
                if last_val is not None:
                    log_metrics({"step": step, "epoch": round(step * cfg.grad_accum / micro_per_epoch, 3),
                                 "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50))})
                    say(f"epoch {now_epoch}: val loss {last_val:.4f}")
                epoch = now_epoch
            if cfg.sample_every and main and (step % cfg.sample_every == 0 or step == total_steps):
                sample(step)
            stopping = (cfg.stop_after_steps is not None and step - start_step >= cfg.stop_after_steps) or bool(
                stop.signal)
            if main and (step % cfg.save_every == 0 or (stopping and step < total_steps)):
                last_ckpt = checkpoint.save(run_dir, step, model, optimizer, scheduler, {
                    "step": step, "tokens_seen": tokens_seen, "loss": loss, "val_loss": last_val}, cfg.keep_checkpoints)
                manifest["last_checkpoint"] = str(last_ckpt)
                write_manifest(run_dir, manifest)
            if stopping and step < total_steps:
                manifest.update(status="paused", stopped_by=stop.name)
                if main:
                    write_manifest(run_dir, manifest)
                say(f"paused at step {step}; continue with: collegeadvisor train --resume {run_dir}")
                return run_dir
    except KeyboardInterrupt:
        fail(AdvisorError(f"interrupted at step {step}; resume from {last_ckpt}" if last_ckpt else "interrupted"))
        raise
    except BaseException as exc:
        fail(exc)
        raise
    finally:
        stop.restore()
        bar.close()

    # --- final adapter and manifest
    if world > 1:  # data parallel: every rank must end with the same adapter
        from accelerate.utils import gather_object

        digests = gather_object([adapter_digest(model)])
        manifest["ranks"] = {"world_size": world, "adapter_sha256": digests}
        if len(set(digests)) > 1:
            exc = TrainingError(f"the {world} ranks ended with different adapter weights: {digests}")
            fail(exc)
            raise exc
    if main:
        final = run_dir / "adapter"
        stage = staging_dir(final)
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        atomic_replace_dir(stage, final)
        elapsed = time.time() - start_time
        manifest["adapter"] = {"files": file_hashes(final)}  # load_run refuses an adapter changed after this
        manifest.update(status="complete", finished=now(), error=None, stopped_by=None, metrics={
            "final_loss": loss, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 50)) if last_val is not None else None,
            "steps": step, "tokens_seen": tokens_seen * world, "train_seconds": elapsed,
            "tokens_per_s": (tokens_seen - start_tokens) * world / max(elapsed, 1e-9) if step > start_step else None,
        })
        write_manifest(run_dir, manifest)
        say(f"done: {run_dir} (loss {loss:.4f}" + (f", val loss {last_val:.4f})" if last_val is not None else ")"))
    accelerator.wait_for_everyone()
    return run_dir
