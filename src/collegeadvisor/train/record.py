"""What a run records in its directory besides checkpoints (train.checkpoint) and metrics (train.metrics): the data
split it trains on, the manifest's sections (running at set-up, then complete), sample replies, and the final adapter.
The recipe writes the manifest (runs.write_manifest); these build what goes in it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from collegeadvisor.config import Config
from collegeadvisor.data.loaders import load_examples, train_val
from collegeadvisor.data.scorecard_qa import retrieval_spec
from collegeadvisor.errors import AdvisorError
from collegeadvisor.fsutil import append_jsonl, atomic_replace_dir, atomic_write_jsonl, file_sha256, staging_dir
from collegeadvisor.generate import answer
from collegeadvisor.integrity import file_hashes
from collegeadvisor.models import base_fingerprint
from collegeadvisor.runs import package_versions
from collegeadvisor.train.planner import Plan, encode


def prepare_data(cfg: Config, tokenizer, run_dir: Path) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(train rows, val rows, val examples, the manifest's data section); the split's copy in run_dir/data."""
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


def running(cfg: Config, p: Plan, run_dir: Path, resolved: str, fmt: dict, data_info: dict, trainable: list,
            device: str, world: int, started: str) -> dict:
    """The running manifest: what the run is (config, base model, format, LoRA, data, versions, device, precision,
    forward passes, schedule)."""
    return {
        "status": "running", "run_dir": str(run_dir.resolve()), "started": started,
        "config": cfg.model_dump(),
        "base_model": base_fingerprint(cfg.base_model, resolved),
        "format": fmt, "max_length": cfg.max_length,
        "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "target": cfg.lora_target,
                 "trainable_params": sum(w.numel() for w in trainable)},
        "data": data_info, "versions": package_versions(),
        "retrieval": retrieval_spec(data_info["context_k"]) if data_info["context_k"] else None,
        "device": device, "dtype": str(p.dtype).replace("torch.", ""), "world_size": world,
        "autocast_bf16": p.autocast, "base_bf16": p.base_bf16,
        "forward_passes": {"packing": cfg.packing, "max_tokens": p.tokens_per_pass, "compile": cfg.compile,
                           "threads": torch.get_num_threads()},
        "schedule": schedule(p),
        "stopped": None,  # why this invocation stopped: set once it does (Training.stopped)
    }


def schedule(p: Plan) -> dict:
    """The manifest's schedule: what a resumed run needs to go on with the same steps and learning rates."""
    return {"total_steps": p.total_steps, "warmup_steps": p.warmup_steps,
            "micro_batches_per_epoch": p.micro_batches_per_epoch, "effective_batch": p.effective_batch,
            "limit": p.limit, "budget": p.budget}


def samples(run_dir: Path, at_step: int, model, tokenizer, chosen: list[dict], cfg: Config, autocast,
            say: Callable[[str], None]) -> None:
    """The model's replies to the chosen validation examples at this step: appended to samples.jsonl, and said."""
    if not chosen:
        return
    prompts = [ex["messages"][:-1] for ex in chosen]
    with autocast():
        replies = answer(model, tokenizer, prompts, [ex.get("context") for ex in chosen], retries=0,
                         max_new_tokens=cfg.sample_max_new_tokens, batch_size=cfg.eval_batch_size)
    rows = [{"step": at_step, "question": p[-1]["content"], "reference": ex["messages"][-1]["content"],
             "reply": r["text"], "stopped_at_eos": r["stopped"], "n_tokens": r["n_tokens"],
             "grounding": (r["grounding"] or {}).get("status")}
            for p, ex, r in zip(prompts, chosen, replies)]
    append_jsonl(run_dir / "samples.jsonl", rows)
    for r in rows:
        say(f"  [step {at_step}] Q: {r['question'][:90]}\n      A: {r['reply'][:200]!r}"
            f"{'' if r['stopped_at_eos'] else ' (no end-of-turn)'}")


def save_adapter(run_dir: Path, model, tokenizer) -> dict:
    """The final adapter with its tokenizer in run_dir/adapter (staged, then swapped in whole); the manifest's
    "adapter" section: its files' sha256 (load_run refuses an adapter changed after this)."""
    final = run_dir / "adapter"
    stage = staging_dir(final)
    model.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    atomic_replace_dir(stage, final)
    return {"files": file_hashes(final)}


def metrics(loss: float | None, val_loss: float | None, steps: int, tokens_seen: int, tokens_now: int | None,
            world: int, seconds: float) -> dict:
    """The complete manifest's metrics; tokens_now: this rank's tokens in this invocation (None when it took no
    step), for its tokens/s."""
    return {
        "final_loss": loss, "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50)) if val_loss is not None else None,
        "steps": steps, "tokens_seen": tokens_seen * world, "train_seconds": seconds,
        "tokens_per_s": tokens_now * world / max(seconds, 1e-9) if tokens_now is not None else None,
    }


def done_line(run_dir: Path, loss: float | None, val_loss: float | None) -> str:
    said = f"loss {loss:.4f}" if loss is not None else "no loss logged"
    return f"done: {run_dir} ({said}" + (f", val loss {val_loss:.4f})" if val_loss is not None else ")")
