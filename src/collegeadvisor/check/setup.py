"""Setup checks of the config and of train's own plan (train.plan): the device, dtype and bf16 settings, epochs,
learning rate, LoRA rank and target, gradient clipping, and padding as train batches it. The plan is reported as
train will run it (steps, epochs, rows kept, precision), never worked out again here."""

from __future__ import annotations

from typing import Sequence

from collegeadvisor.chat_format import IGNORE_INDEX
from collegeadvisor.check.findings import Finding, finding
from collegeadvisor.config import duration_text
from collegeadvisor.errors import ModelError
from collegeadvisor.models import pick_device

SMALL_DATA = 10_000  # fewer training examples than this ...
MIN_EPOCHS_SMALL_DATA = 2.0  # ... need at least this many passes (the seed's 1 epoch on ~8k under-trained)
LORA_LR = (5e-5, 1e-3)  # LoRA learns at 1e-4..3e-4; 2e-5 (the seed's) is a full fine-tuning rate and crawls
LORA_RANK = (4, 256)


def resolve_device(cfg) -> tuple[str, list[Finding]]:
    try:
        return pick_device(cfg.device), []
    except ModelError as exc:
        return cfg.device, [finding("error", "setup", "device", str(exc).split(": ", 1)[-1],
                                    "set device: auto, or cpu", "device-missing")]


def check_plan(p) -> list[Finding]:
    """Train's plan in one line: steps, epochs, the rows it keeps and drops, its precision."""
    dropped = p.dropped["too_long"] + p.dropped["no_labels"]
    cut = f", {p.dropped['truncated']} cut at max_length" if p.dropped["truncated"] else ""
    precision = f"{str(p.dtype).replace('torch.', '')}" + (" with bf16 autocast" if p.autocast else "") + (
        ", base weights in bf16" if p.base_bf16 else "")
    budget = ""
    if p.max_time_s is not None:
        budget = (f"; max_time {duration_text(p.max_time_s)}: train plans the steps that fit it (at most these) at "
                  "the speed of its first step")
    return [finding("info", "setup", "train", f"{p.total_steps} steps of {p.effective_batch} examples "
                    f"({p.epochs:.2f} epochs) over {p.kept} training examples ({dropped} dropped{cut}); {precision} "
                    f"on {p.device}{budget}", code="plan", **p.as_dict())]


def check_precision(cfg, device: str) -> list[Finding]:
    out = []
    wants = cfg.dtype.lower()
    if wants in ("fp16", "float16") and not device.startswith("cuda"):
        out.append(finding("error", "setup", "dtype", f"fp16 on {device}: fp16 overflows to NaN/Inf in training (the "
                           "seed's MPS run: NaN gradients, then a loss that collapsed to 0)",
                           "set dtype: auto (fp32 on CPU and MPS)", "fp16-off-cuda"))
    elif wants in ("bf16", "bfloat16") and device == "mps":
        out.append(finding("warning", "setup", "dtype", "bf16 on mps produced NaN gradients and a collapsing loss",
                           "set dtype: auto (fp32 on MPS)", "bf16-on-mps"))
    elif wants in ("fp16", "float16"):
        out.append(finding("warning", "setup", "dtype", f"fp16 on {device}: this recipe has no loss scaling, so small "
                           "gradients underflow", "set dtype: auto (bf16 where CUDA has it)", "fp16-no-scaler"))
    if device == "cpu" and cfg.autocast_bf16 == "on":
        from collegeadvisor.train.planner import cpu_has_bf16  # the train package imports torch: only here

        if not cpu_has_bf16():
            out.append(finding("warning", "setup", "autocast_bf16", "bf16 autocast on a CPU without AVX512-BF16/AMX is "
                               "emulated and slower than fp32", "set autocast_bf16: auto", "slow-bf16"))
    return out


def check_setup(cfg, schedule: dict, shape: dict | None) -> list[Finding]:
    """The config against what trains a LoRA adapter well; `schedule` is train's (train.planner.schedule)."""
    out = []
    n_train, epochs = schedule["kept"], schedule["epochs"]
    if n_train and n_train < SMALL_DATA and epochs < MIN_EPOCHS_SMALL_DATA:
        by = f"max_steps {cfg.max_steps} = {epochs:.2f} epochs" if cfg.max_steps else f"{cfg.epochs:g} epoch(s)"
        out.append(finding("warning", "setup", "max_steps" if cfg.max_steps else "epochs",
                           f"{by} over {n_train} training examples is too little training (the seed's 1 epoch on ~8k "
                           "examples under-trained)", f"train for at least {MIN_EPOCHS_SMALL_DATA:g} epochs on under "
                           f"{SMALL_DATA:,} examples (epochs: 3)", "too-few-epochs", epochs=epochs))
    lo, hi = LORA_LR
    if not lo <= cfg.learning_rate <= hi:
        why = "a full fine-tuning rate: LoRA learns too slowly with it (the seed's 2e-5)" if cfg.learning_rate < lo \
            else "high enough for LoRA to diverge"
        out.append(finding("warning", "setup", "learning_rate", f"learning_rate {cfg.learning_rate:g} is outside "
                           f"{lo:g}..{hi:g}: {why}", "use 1e-4..3e-4 for LoRA (default 2e-4)", "lr-range"))
    lo, hi = LORA_RANK
    if not lo <= cfg.lora_r <= hi:
        out.append(finding("warning", "setup", "lora_r", f"LoRA rank {cfg.lora_r} is outside {lo}..{hi}",
                           "use 8..64 (default 16, lora_alpha = 2 x rank)", "rank-range"))
    if not cfg.max_grad_norm or cfg.max_grad_norm <= 0:
        out.append(finding("warning", "setup", "max_grad_norm", f"gradient clipping is off (max_grad_norm "
                           f"{cfg.max_grad_norm}): one bad batch can blow the adapter up", "set max_grad_norm: 1.0",
                           "no-clipping"))
    if shape is not None and cfg.lora_target != "all-linear" and shape["lora_modules"] == 0:
        out.append(finding("error", "setup", "lora_target", f"lora_target {cfg.lora_target!r} matches no layer of "
                           "this model", f"use all-linear or some of: {', '.join(shape['linear_names'])}",
                           "lora-target"))
    return out


def check_padding(cfg, tokenizer, rows: Sequence[dict]) -> list[Finding]:
    """Batch two real rows as train does (padded or packed) and make sure padding keeps every label, EOS included."""
    from collegeadvisor.train import batching  # torch: only when padding is checked

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None:
        return [finding("error", "setup", "pad token", "the tokenizer has no pad token and no EOS to pad with",
                        "set tokenizer.pad_token in the model folder", "no-pad")]
    sample = sorted(rows, key=lambda r: len(r["input_ids"]))[:1] + sorted(rows, key=lambda r: -len(r["input_ids"]))[:1]
    if len(sample) < 2 or len(sample[0]["input_ids"]) == len(sample[1]["input_ids"]):
        # make a padded batch even from equal rows: a shorter copy with labels cut accordingly
        base = sample[0] if sample else None
        if base is None:
            return []
        sample = [base, {"input_ids": base["input_ids"][:-1], "labels": base["labels"][:-1]}]
    wanted = sum(sum(1 for l in r["labels"][1:] if l != IGNORE_INDEX) for r in sample)
    wanted_eos = sum(sum(1 for l in r["labels"][1:] if l == eos) for r in sample)
    width = max(len(r["input_ids"]) for r in sample)
    passes = batching.forward_batches(sample, pad, 2 * width * max(1, len(sample)), cfg.packing, width)
    got = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in passes)
    got_eos = sum(int((b["labels"][:, 1:] == eos).sum()) for b in passes)
    same = "equals EOS" if pad == eos else "differs from EOS"
    if got != wanted or got_eos != wanted_eos:
        return [finding("warning", "setup", "pad token", f"pad token {tokenizer.pad_token!r} (id {pad}) {same}, "
                        f"and batching changes the labels: {wanted_eos} labelled EOS tokens became {got_eos}, {wanted} "
                        f"labels became {got}", "mask padding by attention and label it -100 "
                        "(train.batching.collate); never derive labels from input_ids == pad", "pad-eats-labels")]
    return [finding("info", "setup", "pad token", f"pad token {tokenizer.pad_token!r} (id {pad}) {same}: handled, "
                    "padding is masked by attention and labelled -100, so EOS keeps its label", code="pad")]

