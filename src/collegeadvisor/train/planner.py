"""What a training run will do, decided before it starts: the rows it keeps, its precision, steps and epochs, the
memory a step takes and the time the run takes at a measured speed. `train` executes this plan; `check` reports on
it and never works any of it out again.

    rows = encode(cfg, tokenizer, train_examples, val_examples)   # the kept (and dropped) rows
    p = plan(cfg, rows, device)                                    # precision, steps, epochs, memory, ETA
    p = for_time(cfg, p, measured)   # with max_time: the steps that fit it at a measured step's speed
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from collegeadvisor.chat_format import IGNORE_INDEX
from collegeadvisor.config import Config
from collegeadvisor.data.prepare import encode_examples, labelled_count
from collegeadvisor.models import pick_dtype
from collegeadvisor.train.batching import epoch_batches
from collegeadvisor.train.fused import CHUNK, recomputed_layers

# RAM model, calibrated on SmolLM2-135M + LoRA r16 all-linear on CPU (peak RSS of one forward+backward):
# bytes stored for backward per token, per layer, per unit of (hidden + intermediate) size.
ACT_BYTES_BF16 = 22  # bf16 autocast over a bf16 base (measured 21.5)
ACT_BYTES_BF16_FUSED = 18  # the same with train.fused's kernels (measured 18.2: 2.75 GB at 4 x 400, AMD EPYC)
# ... and with recompute_mlp: gate and up not kept (saved for backward at 4 x 512: 341 MB against 701; 18 scaled)
ACT_BYTES_BF16_RECOMPUTED = 9
ACT_BYTES_FP32 = 60  # plain fp32 (measured 59)
LOGIT_BYTES = 12  # per labelled position per vocabulary entry: logits, fp32 copy, softmax gradient
# (with train.fused's kernels only one chunk of labelled positions at a time: train.fused.CHUNK)
RUNTIME_BYTES = 600 * 2**20  # python, torch, tokenizer
VAL_COST = 1 / 3  # a validation token (forward only) costs about a third of a training token


# ----------------------------------------------------------------------------------------------- rows
@dataclass
class Rows:
    """Encoded examples (input_ids, labels, line) as train uses them, and data.prepare's stats of each split."""

    train: list[dict]
    val: list[dict]
    train_stats: dict = field(default_factory=dict)
    val_stats: dict = field(default_factory=dict)


def encode(cfg: Config, tokenizer, train_examples: Sequence[dict], val_examples: Sequence[dict],
           refuse: bool = True) -> Rows:
    """The rows train keeps, from the examples it picked (data.loaders.train_val): training examples under
    cfg.truncation (an answer cut at max_length drops the example, is cut, or stops train), validation examples cut
    to max_length. refuse=False (check) counts the examples truncation: error would stop on as dropped instead."""
    policy = "drop" if cfg.truncation == "error" and not refuse else cfg.truncation
    train_rows, train_stats = encode_examples(tokenizer, train_examples, cfg.max_length, policy, cfg.data)
    val_rows, val_stats = encode_examples(tokenizer, val_examples, cfg.max_length, "truncate",
                                          cfg.val_data or cfg.data)
    return Rows(train_rows, val_rows, train_stats, val_stats)


def pass_tokens(cfg: Config) -> int:
    """Most tokens of one forward pass, padding included: batch_tokens, else batch_size x max_length."""
    return cfg.batch_tokens or cfg.batch_size * cfg.max_length


def label_share(rows: Sequence[dict]) -> float:
    """Share of tokens that carry a label (0.5 without rows)."""
    total = sum(len(r["input_ids"]) for r in rows)
    return sum(labelled_count(r) for r in rows) / total if total else 0.5


# ----------------------------------------------------------------------------------------------- precision
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_autocast(device: str, dtype: torch.dtype, setting: str) -> bool:
    """bf16 autocast where the hardware runs bf16 matmuls fast, over fp32 weights only."""
    if setting == "off" or dtype != torch.float32:
        return False
    if device == "cpu":
        return setting == "on" or cpu_has_bf16()
    if device.startswith("cuda"):
        return setting == "on" or torch.cuda.is_bf16_supported()
    return False


def autocast_context(device: str, on: bool):
    """A factory of bf16 autocast contexts on device (master and LoRA weights stay in their dtype), or of no-ops."""
    if not on:
        return contextlib.nullcontext
    kind = "cpu" if device == "cpu" else "cuda"
    return lambda: torch.autocast(kind, dtype=torch.bfloat16)


def autocast_for(device: str, dtype: torch.dtype, setting: str):
    return autocast_context(device, bf16_autocast(device, dtype, setting))


def precision(cfg: Config, device: str) -> dict[str, Any]:
    """Master dtype, bf16 autocast and whether the frozen base is kept in bf16, for cfg on device."""
    dtype = pick_dtype(device, cfg.dtype)
    autocast = bf16_autocast(device, dtype, cfg.autocast_bf16)
    base_bf16 = dtype == torch.float32 and (cfg.base_bf16 == "on" or (cfg.base_bf16 == "auto" and autocast))
    return {"dtype": dtype, "autocast": autocast, "base_bf16": base_bf16}


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Every decision train makes before its first step. `rows` holds the encoded rows; the rest is plain data."""

    device: str
    world: int
    dtype: torch.dtype
    autocast: bool  # bf16 autocast over fp32 weights
    base_bf16: bool  # the frozen base weights stored in bf16
    kept: int  # training rows kept
    kept_lines: list  # their file lines
    dropped: dict  # training examples left out or cut: too_long, no_labels, truncated, lines (first 20 dropped)
    micro_batches_per_epoch: int  # per rank
    total_steps: int
    warmup_steps: int
    epochs: float
    effective_batch: int
    tokens_per_pass: int  # most tokens of one forward pass, padding included
    train_tokens: float  # padded tokens of every training pass of the run, per rank
    val_tokens: int  # tokens of one validation pass
    label_share: float
    limit: str = "epochs"  # what sets total_steps: max_steps, epochs, or max_time (the steps its budget allows)
    max_time_s: float | None = None  # the time budget (cfg.max_time)
    budget: dict | None = None  # with max_time, once measured (for_time): the speed and the steps the budget allows
    memory: dict | None = None  # the memory estimate of a training step (given the model's shape)
    rows: Rows | None = field(default=None, repr=False, compare=False)

    @property
    def step_tokens(self) -> float:
        """Padded tokens of an average optimizer step, per rank."""
        return self.train_tokens / self.total_steps

    def eta(self, tokens_per_s: float) -> float:
        """Seconds the run takes at a measured training speed: every training pass and a validation pass at each
        epoch's end (sample generations not counted)."""
        val = self.val_tokens * max(1, math.ceil(self.epochs))
        return (self.train_tokens + val * VAL_COST) / tokens_per_s

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "rows"}
        out["dtype"] = str(self.dtype).replace("torch.", "")
        return out


def schedule(cfg: Config, rows: Rows, world: int = 1, steps: int | None = None,
             warmup: int | None = None) -> dict[str, Any]:
    """The rows kept and dropped, steps, epochs and tokens of a run of cfg on these rows with `world` data-parallel
    ranks (each rank takes every world-th micro-batch of an epoch); `steps` replaces max_steps and epochs, and `warmup`
    the warmup steps that warmup_ratio would give."""
    lengths = [len(r["input_ids"]) for r in rows.train]
    micro = max(1, math.ceil(len(lengths) / cfg.batch_size) // world)
    total = steps or cfg.max_steps or max(1, math.ceil(cfg.epochs * micro / cfg.grad_accum))
    epochs = total * cfg.grad_accum / micro
    batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, 0, cfg.group_by_length)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    stats = rows.train_stats
    return dict(
        kept=len(rows.train), kept_lines=[r.get("line") for r in rows.train],
        dropped={"too_long": stats.get("dropped_too_long", 0), "no_labels": stats.get("dropped_no_labels", 0),
                 "truncated": stats.get("truncated", 0), "lines": stats.get("dropped_lines", [])},
        micro_batches_per_epoch=micro, total_steps=total,
        warmup_steps=math.ceil(cfg.warmup_ratio * total) if warmup is None else warmup,
        epochs=epochs, effective_batch=cfg.batch_size * cfg.grad_accum * world, tokens_per_pass=pass_tokens(cfg),
        train_tokens=padded / world * epochs, val_tokens=sum(len(r["input_ids"]) for r in rows.val),
        label_share=label_share(rows.train), limit="max_steps" if cfg.max_steps else "epochs",
    )


def plan(cfg: Config, rows: Rows, device: str, world: int = 1, shape: dict | None = None) -> Plan:
    """The plan of a run of cfg on these rows, on device with `world` data-parallel ranks: its precision and
    schedule; with the model's shape (model_shape), also the memory a training step takes."""
    p = Plan(device=device, world=world, **precision(cfg, device), **schedule(cfg, rows, world), rows=rows,
             max_time_s=cfg.max_time_s)
    if shape is not None:
        p.memory = memory_estimate(cfg, shape, p)
    return p


# ----------------------------------------------------------------------------------------------- a time budget
def step_seconds(p: Plan, measured: dict) -> float:
    """Seconds of the plan's average step at the speed of a measured one ({"seconds", "tokens"}: its forward and
    backward passes over that many padded tokens)."""
    return measured["seconds"] / max(measured["tokens"], 1) * p.step_tokens


def steps_in_time(cfg: Config, p: Plan, seconds: float, step_s: float) -> int:
    """The most optimizer steps that train in `seconds` at step_s seconds a step, with a validation pass at each
    epoch's end (VAL_COST of a training token each); at least 1. Samples and checkpoints are not counted: the clock
    stops the run if they take the rest."""
    val_s = p.val_tokens * VAL_COST * step_s / max(p.step_tokens, 1e-9)

    def cost(n: int) -> float:
        return n * step_s + val_s * max(1, math.ceil(n * cfg.grad_accum / p.micro_batches_per_epoch))

    lo, hi = 1, int(seconds / max(step_s, 1e-9)) + 1
    while lo < hi:  # the largest n with cost(n) <= seconds (cost grows with n)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds else (lo, mid - 1)
    return lo


def with_steps(cfg: Config, p: Plan, steps: int, limit: str, budget: dict | None = None,
               warmup: int | None = None) -> Plan:
    """The plan with its schedule (steps, warmup, epochs, tokens) worked out for `steps` optimizer steps (and
    `warmup` warmup steps where given: a schedule already under way keeps its warmup)."""
    return dataclasses.replace(p, **schedule(cfg, p.rows, p.world, steps, warmup) | {"limit": limit}, budget=budget)


def for_time(cfg: Config, p: Plan, measured: dict) -> Plan:
    """The plan of a run with a time budget (p.max_time_s): the fewer of its steps (max_steps or epochs) and those
    the budget allows at the measured speed, its warmup and decay planned for them, so the learning rate ends
    near the budget instead of being cut mid-decay."""
    step_s = step_seconds(p, measured)
    allowed = steps_in_time(cfg, p, p.max_time_s, step_s)
    budget = {"max_time_s": p.max_time_s, "step_s": step_s, "allowed_steps": allowed,
              "measured_seconds": measured["seconds"], "measured_tokens": measured["tokens"],
              "tokens_per_s": measured["tokens"] / max(measured["seconds"], 1e-9),
              "cap_steps": p.total_steps, "cap_limit": p.limit}
    if allowed < p.total_steps:
        return with_steps(cfg, p, allowed, "max_time", budget)
    return dataclasses.replace(p, budget=budget)


REPLAN_AFTER = 3  # steps at least before the pace is measured again (the first holds the longest example)


def replan_step(p: Plan) -> int | None:
    """The step after which a run planned for max_time (for_time) plans its steps again at the pace of the steps
    so far: warmup's end (the decay still ahead, so the schedule changes without a jump), at least REPLAN_AFTER;
    None without a budget or when the run ends first."""
    at = max(p.warmup_steps, REPLAN_AFTER)
    return at if p.budget and at < p.total_steps else None


def replan(cfg: Config, p: Plan, step: int, elapsed_s: float) -> Plan:
    """The plan of a run with a time budget after `step` steps in elapsed_s seconds of its clock: the steps the
    whole budget allows at that pace (for_time's count, at everything a step of this run has cost: its passes,
    the update, logging, checkpoints), at most the cap (max_steps or epochs) and at least one more; the warmup is
    kept, the decay planned for the new end. The one-step measurement of for_time ran 12-35% fast on 2-core
    machines (BENCHMARKS.md), which left the run to be cut by the clock mid-decay."""
    pace = elapsed_s / max(step, 1)
    b = p.budget
    allowed = steps_in_time(cfg, p, p.max_time_s, pace)
    total = max(step + 1, min(b["cap_steps"], allowed))
    budget = b | {"replanned_at": step, "paced_step_s": pace, "allowed_steps": allowed}
    limit = "max_time" if total < b["cap_steps"] else b["cap_limit"]
    return with_steps(cfg, p, total, limit, budget, warmup=p.warmup_steps)


# ----------------------------------------------------------------------------------------------- memory
def model_shape(resolved: str, cfg: Config) -> dict[str, Any]:
    """Parameter counts and sizes from the model's config, built on the meta device (no weights read), and the
    layers cfg.lora_target puts LoRA on."""
    from transformers import AutoConfig, AutoModelForCausalLM  # transformers (heavy): only when sizing a model

    config = AutoConfig.from_pretrained(resolved)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if cfg.lora_target == "all-linear":
        targets = [m for _, m in linear]
    else:
        keys = [k.strip() for k in cfg.lora_target.split(",") if k.strip()]
        targets = [m for n, m in linear if any(n == k or n.endswith("." + k) for k in keys)]
    text = getattr(config, "text_config", None) or config
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "lora_params": sum(cfg.lora_r * (m.in_features + m.out_features) for m in targets),
        "lora_modules": len(targets),
        "linear_names": sorted({n.rsplit(".", 1)[-1] for n, _ in linear}),
        "layers": getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0),
        "hidden": getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0),
        "intermediate": getattr(text, "intermediate_size", None) or 4 * (getattr(text, "hidden_size", 0) or 0),
        "vocab": getattr(text, "vocab_size", 0),
        "max_positions": getattr(text, "max_position_embeddings", None),
    }


def activation_bytes(cfg: Config, layers: int) -> float:
    """ACT_BYTES_* of a bf16 step with cfg's kernels, averaged over the layers: those that fuse_kernels has recompute
    their MLP (train.fused.recomputed_layers, with fused kernels only) keep less."""
    if not cfg.fused:
        return ACT_BYTES_BF16
    share = len(recomputed_layers(layers, cfg.recompute_mlp)) / layers if layers else cfg.recompute_mlp
    return ACT_BYTES_BF16_FUSED - share * (ACT_BYTES_BF16_FUSED - ACT_BYTES_BF16_RECOMPUTED)


def memory_estimate(cfg: Config, shape: dict, p: Plan) -> dict[str, int]:
    """Peak memory of a training step: weights, LoRA weights with gradient and Adam state, activations kept for
    backward over one forward pass (batch_tokens, or batch_size x max_length), and logits at labelled positions."""
    tokens = p.tokens_per_pass
    bf16 = p.autocast or p.dtype in (torch.bfloat16, torch.float16)
    loaded = shape["params"] * p.dtype.itemsize  # train loads in dtype, then keeps the base in bf16
    parts = {
        "weights": max(loaded, shape["params"] * 2) if p.base_bf16 else loaded,
        "lora": shape["lora_params"] * 16,
        "activations": round(tokens * shape["layers"] * (shape["hidden"] + shape["intermediate"])
                             * (activation_bytes(cfg, shape["layers"]) if bf16 else ACT_BYTES_FP32)),
        "logits": int(min(p.label_share * tokens, CHUNK if cfg.fused else tokens) * shape["vocab"] * LOGIT_BYTES),
        "runtime": RUNTIME_BYTES,
    }
    parts["total"] = sum(parts.values())
    parts["tokens_per_pass"] = tokens
    return parts
