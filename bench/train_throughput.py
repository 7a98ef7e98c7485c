"""Training throughput: the seed recipe, TRL's SFTTrainer and ours, on the same Scorecard examples and model.

    python bench/train_throughput.py --quick        # about 8 minutes on a quiet 2-core machine; writes BENCHMARKS.md
    python bench/train_throughput.py                # more steps per recipe (about 25 minutes there)
    python bench/train_throughput.py --examples 16 --steps 2 --no-write   # a smoke test

One run measures, for each recipe in its own child process (so peak RSS is that recipe's alone):
  seed  HF Trainer, padding="max_length" to 512, fp32, batch 4 (the seed project's pipeline);
  trl   TRL SFTTrainer with its defaults (batch 8, gradient checkpointing, bf16 autocast; use_cpu=True on CPU);
  ours  collegeadvisor.train.train with its defaults (batch 4 x grad_accum 4, length grouping, bf16 frozen base
        and autocast where the CPU has bf16, label-only logits; no validation split, samples or checkpoints);
all with SmolLM2-135M-Instruct (the embedded model) and the same LoRA: r 16, alpha 32, dropout 0 (ours' default), every
linear layer. Every recipe draws its batches from the same seeded subset of the Scorecard dataset (the quickstart's
mix, examples that fit 512 tokens): ours one pass over it, the seed and TRL a few steps (MODES). Each recipe's
first optimizer step is warm-up and is not timed.

Definitions:
  real tokens   non-pad input tokens (attention-mask ones; for ours, the examples' own lengths);
  tokens/s      real tokens of the timed steps / wall time from the end of step 1 to the end of the last step
                (the seed: 4 x the epoch's mean real tokens per example / its mean step time, as every seed step
                costs 4 x 512 whatever the lengths);
  s/epoch       real tokens of one pass over the whole dataset / tokens/s;
  peak RSS      ru_maxrss of the recipe's process (imports, data, model load and training);
  FLOPs/token   4*N_linear + 6*N_lora + 12*L*d_attn*ctx + 4*d*V*f_lab: forward (2N) plus the input gradient
                (2N; the base is frozen, so no weight gradients) through the linear layers, forward + both
                gradients (6 per weight) of the LoRA factors, causal attention scores over an average context
                `ctx`, and the output layer at labelled positions only (share f_lab), the only logits the loss needs;
  mfu_bf16      FLOPs/token x tokens/s / the matmul peak torch reaches at the model's shapes (2048 x d @ d x
                intermediate) in the dtype the run computes in (bf16 where the CPU has AVX512-BF16 or AMX, else fp32:
                an emulated bf16 peak means nothing there; the name stays for the last line's readers);
  peak          the median of PROBES short matmul probes run inside ours' training loop (one before the first
                step, the rest after steps spread over the run, on the run's threads), so they sample the same
                machine conditions as the timed steps; their time is taken out of the timed span. The spread
                (min-max, max/min) is printed beside MFU: one peak measured once read 204 GFLOP/s on one machine
                and 987 on another of the same kind. SmolLM2-shaped rows divide by ours' median, the TinyLlama
                row by ours-tinyllama's; a peak measured once up front, before the recipes, is kept for reference
                (and is the fallback where a run has no probes).
Allocator: ours runs under jemalloc where it is installed, as `collegeadvisor train` does (the lever "ours, glibc
malloc" is ours without it); the seed and TRL under glibc's malloc, as their own scripts run.
Without AMX on an AMX machine: `--max-isa AVX512_CORE_BF16` caps oneDNN (torch's CPU matmul and attention kernels)
below AMX for the probes and every recipe (ONEDNN_MAX_CPU_ISA). Check its up-front peak before trusting it: on the
developers' Xeon (2026-12-07) the capped bf16 peak read 229 GFLOP/s, under its fp32 peak (429) and a quarter of an
AVX512-BF16 EPYC's (987), so that cap is no stand-in for a machine without AMX there.
Also measured: ours at batch 4 x 512 (the longest examples, one pass a step), ours on a TinyLlama-1.1B-shaped model
(random weights, config from ../shared/reference/; SmolLM2 token ids folded into its 32,000-token vocabulary), and
a torch.profiler run of ours (operator self time: where the time goes).

The last line is `ratio_vs_seed=X ratio_vs_trl=Y mfu_bf16=Z mfu_bf16_tinyllama=T peak_rss_gb=W peak_gflops=P
peak_min_gflops=A peak_max_gflops=B peak_probes=N peak_dtype=D upfront_peak_gflops=U` (W: the larger of ours and
ours at batch 4 x 512; P: the median peak ours' MFU divides by, A-B its probes' spread, U the one-off measurement
before the recipes ran, in bf16). Levers (LEVERS) are ours with one setting changed, to measure each on its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import write_section  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BASE = "embedded:smollm2-135m-instruct"
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")  # ours' defaults
MAX_LENGTH = 512
TINYLLAMA = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tinyllama-1.1b-chat-v1.0.json"
GOALS = {"vs_seed": 10.0, "vs_trl": 8.0, "rss_gb": 2.0,
         # MFU against the bench's measured bf16 peak: (SmolLM2, TinyLlama shape), without and with AMX
         "mfu": {False: (0.50, 0.50), True: (0.20, 0.40)}}
# Levers measured on their own: ours with one setting changed (same data, steps and seed as "ours").
LEVERS = {"ours-unfused": {"fused": False}, "ours-keep-mlp": {"recompute_mlp": 0.0},
          "ours-recompute-all": {"recompute_mlp": 1.0},
          "ours-flash-backward": {"fused_attention": False}, "ours-eager-elementwise": {"fused_elementwise": False},
          "ours-dropout": {"lora_dropout": 0.05}, "ours-1024": {"batch_tokens": 1024}, "ours-glibc": {}}
# The allocator each recipe runs under, as its own command line would run it: `collegeadvisor train` runs itself under
# jemalloc where it is installed (cli.under_jemalloc); the seed's and TRL's scripts get glibc's malloc. "ours-glibc"
# is ours under glibc: the allocator as a lever of its own.
GLIBC = ("seed", "trl", "ours-glibc")
# Per mode: the subset every recipe draws from, and each recipe's optimizer steps (step 1 is warm-up; 0: one pass
# over the subset). The seed's steps all cost the same (always 4 x 512), so a few suffice; TRL's are the slowest.
MODES = {
    "quick": {"examples": 48, "seed": 5, "trl": 4, "ours": 0, "ours-long": 3, "ours-tinyllama": 3,
              "tinyllama_accum": 1, "ours-profile": 2},
    "full": {"examples": 256, "seed": 24, "trl": 16, "ours": 0, "ours-long": 6, "ours-tinyllama": 4,
             "tinyllama_accum": 4, "ours-profile": 3},
}
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
# Matmul probes interleaved with ours' steps (about this many in all, spread over the run), and each one's timed
# length: short, so that they cost ~1-3% of a quick run's training time, which is left out of tokens/s anyway.
PROBES = 9
PROBE_SECONDS = 0.25


# ============================================================================================ shared helpers
def rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


class RssSampler:
    """Peak RSS after `mark()` (the training phase), sampled every 50 ms; ru_maxrss also counts the load."""

    def __init__(self):
        self.since, self.peak, self._stop = None, 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def mark(self) -> None:
        if self.since is None:
            self.since = time.time()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            if self.since is not None:
                self.peak = max(self.peak, rss_now())

    def stop(self) -> int:
        self._stop.set()
        return max(self.peak, rss_now() if self.since is not None else 0)


def model_shape(config: dict) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    return {k: int(config[k]) for k in keys}


def flops_per_token(shape: dict, r: int, label_share: float, mean_context: float) -> dict:
    d, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv, vocab = shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]
    hd = d // heads
    linears = [(d, heads * hd), (d, kv * hd), (d, kv * hd), (heads * hd, d), (d, i), (d, i), (i, d)]
    n_linear = layers * sum(a * b for a, b in linears)
    n_lora = layers * r * sum(a + b for a, b in linears)
    parts = {"linear": 4 * n_linear, "lora": 6 * n_lora, "attention": 12 * layers * heads * hd * mean_context,
             "head": 4 * d * vocab * label_share}
    return {"per_token": sum(parts.values()), "parts": parts, "n_linear": n_linear, "n_lora": n_lora}


def matmul_peak(m: int, k: int, n: int, dtype_name: str, seconds: float = 1.5) -> float:
    """Best FLOP/s of (m x k) @ (k x n) over three timed rounds, on torch's current threads. The operands come from
    a private generator: a probe inside a training run must not move the run's random stream (dropout, order)."""
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 3:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / elapsed)
    return best


def probe_peak(m: int, k: int, n: int, dtype_name: str, seconds: float = PROBE_SECONDS) -> float:
    """One short reading of the matmul peak (matmul_peak's method: warm-up, best of three rounds), to run between
    training steps."""
    return matmul_peak(m, k, n, dtype_name, seconds)


def probe_schedule(total_steps: int, target: int = PROBES) -> dict[int, int]:
    """How many probes to run after each optimizer step (key 0: before the first step): `target` in all, spread
    evenly from before the first step to after the last. A run of fewer steps than probes gets several probes
    after some steps (a quick run's ours has 3 steps)."""
    counts: dict[int, int] = {}
    for i in range(target):
        after = round(i * total_steps / max(target - 1, 1))
        counts[after] = counts.get(after, 0) + 1
    return counts


def probe_seconds_in_span(readings: list[dict], first_step: int, last_step: int) -> float:
    """Wall time of the probes that ran inside the timed span, which runs from step `first_step`'s logged end to
    step `last_step`'s. A probe runs right after its step is logged (log_every 1), so the one after step s falls
    between the ends of steps s and s+1: inside the span when first_step <= s < last_step."""
    return sum(r["seconds"] for r in readings if first_step <= r["after_step"] < last_step)


def peak_spread(values: list[float]) -> dict:
    """Median (what MFU divides by) and spread of probe readings: min, max, max/min and the quartiles."""
    v = sorted(values)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
    return {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3,
            "max_over_min": v[-1] / v[0]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(path: Path, obj) -> None:
    from collegeadvisor.fsutil import atomic_write_json

    atomic_write_json(path, obj)


# ============================================================================================ child: one recipe
def hf_clock():
    """A Trainer callback recording the wall time at each step's end and each logged loss."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.sampler = [], [], None

        def on_train_begin(self, args, state, control, **kw):
            if self.sampler:
                self.sampler.mark()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Clock()


def counting(collate, counts: list[int], pad_id: int):
    """Wrap a collator to record each batch's real (non-pad) tokens, in the order the loop consumes them."""

    def wrapped(features):
        batch = collate(features)
        if "attention_mask" in batch:
            counts.append(int(batch["attention_mask"].sum()))
        elif "position_ids" in batch:  # padding-free: one row, no padding
            counts.append(int(batch["input_ids"].numel()))
        else:
            counts.append(int((batch["input_ids"] != pad_id).sum()))
        return batch

    return wrapped


def hf_result(clock, counts: list[int], steps: int) -> dict:
    ends = clock.ends
    if len(ends) < 2:
        raise RuntimeError(f"only {len(ends)} steps ran; need 2 or more (1 warm-up + timed)")
    timed_tokens = sum(counts[1 : len(ends)])
    seconds = ends[-1] - ends[0]
    return {"steps": len(ends), "timed_steps": len(ends) - 1, "timed_tokens": timed_tokens, "timed_s": seconds,
            "tokens_per_s": timed_tokens / seconds, "final_loss": clock.losses[-1] if clock.losses else None,
            "losses": clock.losses}


def tinyllama_shape() -> dict:
    return json.loads(TINYLLAMA.read_text())["config"]


def random_tinyllama(dtype):
    """TinyLlama-1.1B's architecture with random weights (its published config.json values)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = tinyllama_shape()
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "vocab_size", "tie_word_embeddings", "hidden_act")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: ref[k] for k in keep if k in ref}, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(cfg).to(dtype or torch.float32)


def fold_ids(rows: list[dict], vocab: int) -> list[dict]:
    """SmolLM2 ids into a smaller vocabulary: same lengths and label masks, ids mod vocab."""
    return [{**r, "input_ids": [t % vocab for t in r["input_ids"]],
             "labels": [t if t < 0 else t % vocab for t in r["labels"]]} for r in rows]


def child_seed(args, sampler) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from collegeadvisor.data.prepare import conversation
    from collegeadvisor.models import load_model, load_tokenizer, resolve_base_model

    path = resolve_base_model(BASE)
    tok = load_tokenizer(path)
    model = load_model(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(**LORA))
    texts = [tok.apply_chat_template(conversation(ex), tokenize=False) for ex in read_jsonl(args.data)]
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH)
    ds = Dataset.from_dict(dict(enc))
    counts: list[int] = []
    collate = counting(DataCollatorForLanguageModeling(tok, mlm=False), counts, tok.pad_token_id)
    clock = hf_clock()
    clock.sampler = sampler
    targs = TrainingArguments(
        output_dir=str(args.workdir / "seed"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=2e-4, num_train_epochs=1, max_steps=args.steps or -1, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, fp16=False, seed=0, disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate, callbacks=[clock]).train()
    out = hf_result(clock, counts, args.steps)
    out["settings"] = "HF Trainer, padding max_length 512, fp32, batch 4, lr 2e-4"
    return out


def child_trl(args, sampler) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from collegeadvisor.data.prepare import conversation
    from collegeadvisor.models import load_tokenizer, resolve_base_model

    path = resolve_base_model(BASE)
    tok = load_tokenizer(path)
    ds = Dataset.from_list([{"messages": conversation(ex)} for ex in read_jsonl(args.data)])
    import torch

    cpu = not torch.cuda.is_available()
    cfg = SFTConfig(output_dir=str(args.workdir / "trl"), use_cpu=cpu, num_train_epochs=1, max_steps=args.steps or -1,
                    logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True)
    clock = hf_clock()
    clock.sampler = sampler
    trainer = SFTTrainer(model=path, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(**LORA), callbacks=[clock])
    counts: list[int] = []
    trainer.data_collator = counting(trainer.data_collator, counts, tok.pad_token_id)
    trainer.train()
    out = hf_result(clock, counts, args.steps)
    out["settings"] = (f"SFTTrainer defaults: batch {cfg.per_device_train_batch_size}, gradient checkpointing "
                       f"{cfg.gradient_checkpointing}, bf16 {cfg.bf16}, max_length {cfg.max_length}, lr "
                       f"{cfg.learning_rate}, loss on all tokens (assistant_only_loss {cfg.assistant_only_loss})"
                       + (", use_cpu=True" if cpu else ""))
    return out


def interleave_probes(training_cls, shape: tuple[int, int, int], probes: dict) -> None:
    """Patch the recipe's Training class so that short matmul probes run inside its loop: before the first step and
    after the steps probe_schedule picks, on the run's threads and in the dtype it computes in (bf16 where it
    autocasts or keeps the base in bf16, else its master dtype). Each reading keeps the step it followed and the
    probe's whole wall time (operands and warm-up included), which timed_span takes out of the timed span."""
    real_loop, real_after_step = training_cls.loop, training_cls.after_step
    schedule: dict[int, int] = {}

    def run_probes(after_step: int) -> None:
        for _ in range(schedule.get(after_step, 0)):
            start = time.perf_counter()
            flops = probe_peak(*shape, probes["dtype"])
            probes["readings"].append({"after_step": after_step, "flops_per_s": flops,
                                       "seconds": time.perf_counter() - start})

    def loop(self):
        plan = self.plan
        computes_bf16 = plan.autocast or plan.base_bf16
        probes["dtype"] = "bfloat16" if computes_bf16 else str(plan.dtype).removeprefix("torch.")
        schedule.update(probe_schedule(plan.total_steps))
        run_probes(0)  # before the loop sets its start time: outside every step's interval
        return real_loop(self)

    def after_step(self, *a, **kw):
        reason = real_after_step(self, *a, **kw)  # logs this step's end (elapsed_s) before the probes run
        run_probes(self.step)
        return reason

    training_cls.loop, training_cls.after_step = loop, after_step


def timed_span(rows: list[dict], readings: list[dict]) -> dict:
    """Tokens and seconds of the timed steps (after the warm-up step) from ours' metrics rows, less the probes that
    ran between them: tokens/s counts training time only."""
    probe_s = probe_seconds_in_span(readings, rows[0]["step"], rows[-1]["step"])
    tokens = rows[-1]["tokens_seen"] - rows[0]["tokens_seen"]
    seconds = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"] - probe_s
    return {"timed_tokens": tokens, "timed_s": seconds, "probe_s_excluded": probe_s}


def child_ours(args, sampler) -> dict:
    from collegeadvisor.config import load_config
    from collegeadvisor.runs import read_manifest
    from collegeadvisor.train import recipe, step, train

    real_init = recipe.LabelLoss.__init__

    def marked(self, model, **kw):  # built after the model, LoRA and dtype set-up: the training phase starts
        sampler.mark()
        real_init(self, model, **kw)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            args.profiler = profile(activities=[ProfilerActivity.CPU])
            args.profiler.__enter__()

    recipe.LabelLoss.__init__ = marked
    if args.tinyllama:
        vocab = tinyllama_shape()["vocab_size"]
        real_prepare = recipe.prepare_data
        # where train.step.build_model loads the base (patching a name the recipe no longer reads changes nothing:
        # the run of 2026-12-07 trained SmolLM2 under this row's name, 775 tokens/s and 1.84 GB)
        step.load_model = lambda resolved, dtype=None, device="cpu": random_tinyllama(dtype).to(device)
        recipe.prepare_data = lambda *a: (lambda tr, va, vx, info: (fold_ids(tr, vocab), fold_ids(va, vocab), vx,
                                                                    info))(*real_prepare(*a))
    probes = {"shape": None, "dtype": None, "readings": []}
    if args.probe_shape:  # "M,K,N": the parent asks for probes at the shapes its peak is measured at
        probes["shape"] = [int(x) for x in args.probe_shape.split(",")]
        interleave_probes(recipe.Training, tuple(probes["shape"]), probes)
    per_step = 4 * (1 if args.long else args.grad_accum or 4)  # batch 4 x grad_accum 4 by default
    settings = dict(base_model=BASE, data=str(args.data), output_dir=str(args.workdir / "runs"), run_name=args.recipe,
                    max_steps=args.steps or math.ceil(len(read_jsonl(args.data)) / per_step), val_fraction=0.0, sample_every=0, save_every=10**6, log_every=1, seed=0)
    settings.update(json.loads(args.settings or "{}"))
    if args.long:
        settings.update(grad_accum=1)  # one 4 x ~512 pass per step: the memory figure of the goal
    elif args.grad_accum:
        settings.update(grad_accum=args.grad_accum)  # fewer examples a step: shorter runs of the 1.1B shape
    shutil.rmtree(args.workdir / "runs" / args.recipe, ignore_errors=True)
    run = train(load_config(None, settings), log=lambda *_: None)
    if args.profile:
        args.profiler.__exit__(None, None, None)
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    if len(rows) < 2:
        raise RuntimeError(f"only {len(rows)} steps ran; need 2 or more (1 warm-up + timed)")
    m = read_manifest(run)
    span = timed_span(rows, probes["readings"])
    out = {"steps": len(rows), "timed_steps": len(rows) - 1, **span,
           "tokens_per_s": span["timed_tokens"] / span["timed_s"], "final_loss": rows[-1]["loss"],
           "losses": [r["loss"] for r in rows],
           "settings": (f"batch {m['config']['batch_size']} x grad_accum {m['config']['grad_accum']}, group_by_length "
                        f"{m['config']['group_by_length']}, packing {m['config']['packing']}, autocast_bf16 "
                        f"{m['autocast_bf16']}, base_bf16 {m['base_bf16']}, fused {m['config'].get('fused')}, recompute_mlp "
                        f"{m['config'].get('recompute_mlp', 0.0)}, fused_attention "
                        f"{m['config'].get('fused_attention', False)}, fused_elementwise "
                        f"{m['config'].get('fused_elementwise', False)}, max {m['forward_passes']['max_tokens']} "
                        f"tokens a pass, {m['forward_passes']['threads']} threads, lr {m['config']['learning_rate']}, "
                        "loss on assistant tokens")}
    if args.profile:
        out["profile"] = profile_rows(args.profiler)
    if probes["readings"]:
        out["probes"] = probes
    return out


def profile_rows(prof, top: int = 14) -> dict:
    """Self CPU time by operator; matmul share = time in the matmul kernels over all operator time."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm",
                                                                       "aten::_scaled_dot_product_flash_attention_for_cpu",
                                                                       "aten::_scaled_dot_product_flash_attention_for_cpu_backward"))
    rows = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    return {"total_s": total / 1e6, "matmul_share": matmul / total, "top": rows}


def run_child(args) -> None:
    sampler = RssSampler()
    start = time.time()
    fn = {"seed": child_seed, "trl": child_trl}.get(args.recipe.split("-")[0], child_ours)
    out = fn(args, sampler)
    import torch

    out.update(recipe=args.recipe, peak_rss_gb=peak_rss() / 1e9, train_rss_gb=sampler.stop() / 1e9,
               wall_s=time.time() - start, threads=torch.get_num_threads())
    write_json(args.json, out)


# ============================================================================================ parent
def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name"))
        flags = next(l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags"))
        info["flags"] = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gb"] = int(mem) / 1e6
    except (OSError, StopIteration):
        pass
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def prepare_data(data_dir: Path, n_examples: int, long_examples: int) -> dict:
    """The Scorecard dataset (as the quickstart builds it: answers read from retrieved rows), encoded once for lengths; the examples that fit
    max_length are the epoch; a seeded subset is what every recipe trains on; the longest are the 4 x 512 run."""
    from collegeadvisor.data.loaders import load_examples
    from collegeadvisor.data.prepare import encode_examples
    from collegeadvisor.data.scorecard_qa import build_scorecard_dataset
    from collegeadvisor.fsutil import atomic_write_jsonl
    from collegeadvisor.models import load_tokenizer, resolve_base_model

    full = data_dir / "scorecard.jsonl"
    if not full.is_file():
        build_scorecard_dataset(data_dir, n_heldout=0)
    tok = load_tokenizer(resolve_base_model(BASE))
    examples, _ = load_examples(full)
    keys = ("messages", "context")
    fits, lengths, labelled = [], [], []
    for ex in examples:
        rows, _ = encode_examples(tok, [ex], MAX_LENGTH, "drop")
        if rows:
            fits.append({k: ex[k] for k in keys if k in ex})
            lengths.append(len(rows[0]["input_ids"]))
            labelled.append(sum(1 for t in rows[0]["labels"][1:] if t != -100))
    order = list(range(len(fits)))
    random.Random(0).shuffle(order)
    subset = order[:n_examples]
    longest = sorted(range(len(fits)), key=lambda i: -lengths[i])[:long_examples]
    atomic_write_jsonl(data_dir / "bench-subset.jsonl", [fits[i] for i in subset])
    atomic_write_jsonl(data_dir / "bench-long.jsonl", [fits[i] for i in longest])

    def stats(idx):
        toks = sum(lengths[i] for i in idx)
        return {"n": len(idx), "tokens": toks, "label_share": sum(labelled[i] for i in idx) / toks,
                "mean_context": sum(lengths[i] * (lengths[i] + 1) / 2 for i in idx) / toks,
                "min": min(lengths[i] for i in idx), "max": max(lengths[i] for i in idx),
                "mean": toks / len(idx)}

    return {"dataset": str(full), "examples": len(examples),
            "epoch": stats(range(len(fits))), "subset": stats(subset), "long": stats(longest),
            "paths": {"subset": str(data_dir / "bench-subset.jsonl"), "long": str(data_dir / "bench-long.jsonl")}}


def allocator_env(name: str) -> tuple[str, dict]:
    """The allocator a recipe runs under (GLIBC) and the environment that gives it that one, with ours' kernel
    caches bounded as `collegeadvisor train` bounds them (cli.KERNEL_CACHES)."""
    from collegeadvisor.cli import JEMALLOC, bounded_kernel_caches, jemalloc_library

    env = dict(os.environ)
    if name.startswith("ours"):
        bounded_kernel_caches("train", env)
    env["LD_PRELOAD"] = " ".join(p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if JEMALLOC not in p)
    lib = None if name.split("-")[0] in GLIBC or name in GLIBC else jemalloc_library()
    if lib:
        env["LD_PRELOAD"] = " ".join(filter(None, (lib, env["LD_PRELOAD"])))
    return ("jemalloc" if lib else "glibc"), env


def launch(name: str, extra: list[str], workdir: Path, timeout: int) -> dict:
    out, log = workdir / f"{name}.json", workdir / f"{name}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--recipe", name, "--workdir", str(workdir),
           "--json", str(out), *extra]
    allocator, env = allocator_env(name)
    start = time.time()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    if code != 0 or not out.is_file():
        tail = [l for l in log.read_text(errors="replace").splitlines() if l.strip()][-1:] or ["no output"]
        result = {"recipe": name, "error": f"exit {code}: {tail[0][:300]}", "wall_s": time.time() - start}
    else:
        result = json.loads(out.read_text())
    result["allocator"] = allocator
    print(f"  {name} ({allocator}): " + (f"{result['tokens_per_s']:.0f} real tokens/s, peak RSS {result['peak_rss_gb']:.2f} GB, "
                           f"{result['wall_s']:.0f} s" if "error" not in result else result["error"]), flush=True)
    return result


def fmt(x, spec=".0f", none="n/a"):
    return none if x is None else format(x, spec)


def parent(args) -> None:
    import torch

    mode = MODES["quick" if args.quick else "full"]
    n_examples = args.examples or mode["examples"]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    mach, vers = machine(), versions()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores, flags {' '.join(mach['flags']) or 'none'}; "
          f"torch {vers['torch']} on {torch.get_num_threads()} threads", flush=True)

    data = prepare_data(Path(args.data_dir), n_examples, 4 * (args.steps or mode["ours-long"]))
    print(f"data: {data['epoch']['n']} of {data['examples']} examples fit {MAX_LENGTH} tokens; subset "
          f"{data['subset']['n']} (mean {data['subset']['mean']:.0f} tokens); {time.time() - t0:.0f} s", flush=True)

    smol_shape = model_shape(json.loads((Path(resolve_base()) / "config.json").read_text()))
    tl_shape = model_shape(tinyllama_shape())
    peaks = {
        "smol_bf16": matmul_peak(2048, smol_shape["hidden_size"], smol_shape["intermediate_size"], "bfloat16"),
        "smol_fp32": matmul_peak(2048, smol_shape["hidden_size"], smol_shape["intermediate_size"], "float32"),
        "tl_bf16": matmul_peak(2048, tl_shape["hidden_size"], tl_shape["intermediate_size"], "bfloat16"),
    }
    print(f"matmul peak, measured once up front (MFU uses the probes interleaved with ours' steps): bf16 "
          f"{peaks['smol_bf16'] / 1e9:.0f} GFLOP/s (2048x{smol_shape['hidden_size']} @ "
          f"{smol_shape['hidden_size']}x{smol_shape['intermediate_size']}), fp32 {peaks['smol_fp32'] / 1e9:.0f}, "
          f"bf16 at TinyLlama's shapes {peaks['tl_bf16'] / 1e9:.0f}", flush=True)

    subset, long_ = ["--data", data["paths"]["subset"]], ["--data", data["paths"]["long"]]
    steps = lambda name, default: ["--steps", str(args.steps or default)] if (args.steps or default) else []  # noqa
    # the two runs whose MFU is a goal probe the peak between their steps, at the shapes of the up-front peaks
    probe = lambda shape: ["--probe-shape", f"2048,{shape['hidden_size']},{shape['intermediate_size']}"]  # noqa
    plan = [("seed", subset + steps("seed", mode["seed"])),
            ("trl", subset + steps("trl", mode["trl"] or math.ceil(n_examples / 8))),
            ("ours", subset + probe(smol_shape) + steps("ours", mode["ours"] or math.ceil(n_examples / 16))),
            ("ours-long", long_ + ["--long"] + steps("ours-long", mode["ours-long"])),
            ("ours-tinyllama", subset + ["--tinyllama", "--grad-accum", str(mode["tinyllama_accum"])]
             + probe(tl_shape) + steps("ours-tinyllama", mode["ours-tinyllama"]))]
    plan += [(name, subset + ["--settings", json.dumps(change)] + steps("ours", mode["ours"] or math.ceil(n_examples / 16)))
             for name, change in LEVERS.items()]
    if not args.no_profile:
        plan.append(("ours-profile", subset + ["--profile"] + steps("ours-profile", mode["ours-profile"])))
    results = {}
    for name, extra in plan:
        saved = workdir / f"{name}.json"
        if args.reuse_results and saved.is_file():
            results[name] = json.loads(saved.read_text())
        else:
            results[name] = launch(name, extra, workdir, args.timeout)

    # --- figures
    sub, lng = data["subset"], data["long"]
    f_smol = flops_per_token(smol_shape, LORA["r"], sub["label_share"], sub["mean_context"])
    f_long = flops_per_token(smol_shape, LORA["r"], lng["label_share"], lng["mean_context"])
    f_tl = flops_per_token(tl_shape, LORA["r"], sub["label_share"], sub["mean_context"])
    flop = {"seed": f_smol, "trl": f_smol, "ours": f_smol, "ours-long": f_long, "ours-tinyllama": f_tl,
            "ours-profile": f_smol, **{name: f_smol for name in LEVERS}}
    seed = results.get("seed")
    if seed is not None and "error" not in seed:  # every seed step costs 4 x 512: scale by the epoch's mean length
        seed["measured_tokens_per_s"] = seed["tokens_per_s"]
        seed["tokens_per_s"] = 4 * data["epoch"]["mean"] / (seed["timed_s"] / seed["timed_steps"])
    ok = lambda r: r is not None and "error" not in r  # noqa: E731
    mfu_peaks = {"smol": mfu_peak(results.get("ours"), peaks["smol_bf16"]),
                 "tl": mfu_peak(results.get("ours-tinyllama"), peaks["tl_bf16"])}
    peak_for = lambda name: mfu_peaks["tl" if "tinyllama" in name else "smol"]["median"]  # noqa: E731
    for name, r in results.items():
        if ok(r):
            r["mfu_bf16"] = r["tokens_per_s"] * flop[name]["per_token"] / peak_for(name)
            r["s_per_epoch"] = data["epoch"]["tokens"] / r["tokens_per_s"]
    ours, seed, trl, long_r, tl = (results.get(k) for k in ("ours", "seed", "trl", "ours-long", "ours-tinyllama"))
    ratio = lambda a, b: a["tokens_per_s"] / b["tokens_per_s"] if ok(a) and ok(b) else None  # noqa: E731
    vs_seed, vs_trl = ratio(ours, seed), ratio(ours, trl)
    mfu = ours["mfu_bf16"] if ok(ours) else None
    mfu_tl = tl["mfu_bf16"] if ok(tl) else None
    rss_all = [r["peak_rss_gb"] for r in (ours, long_r) if ok(r)]
    rss = max(rss_all) if rss_all else None
    amx = "amx_bf16" in mach["flags"] and "AMX" in os.environ.get("ONEDNN_MAX_CPU_ISA", "AMX").upper()

    body = report(args, mach, vers, data, peaks, mfu_peaks, f_smol, f_tl, results, vs_seed, vs_trl,
                  (mfu, mfu_tl, amx), rss, time.time() - t0)
    print()
    print(body)
    if not args.no_write:
        title = "Training throughput" + (f", oneDNN capped at {args.max_isa}" if args.max_isa else "")
        write_section(title, body)
        print(f"\nwrote the '{title}' section of BENCHMARKS.md")
    mp = mfu_peaks["smol"]  # new fields go after the old ones: readers of the first five keep working
    print(f"ratio_vs_seed={fmt(vs_seed, '.2f')} ratio_vs_trl={fmt(vs_trl, '.2f')} mfu_bf16={fmt(mfu, '.3f')} "
          f"mfu_bf16_tinyllama={fmt(mfu_tl, '.3f')} peak_rss_gb={fmt(rss, '.2f')} "
          f"peak_gflops={mp['median'] / 1e9:.0f} peak_min_gflops={mp['min'] / 1e9:.0f} "
          f"peak_max_gflops={mp['max'] / 1e9:.0f} peak_probes={mp['n'] if mp['interleaved'] else 0} "
          f"peak_dtype={mp['dtype']} upfront_peak_gflops={peaks['smol_bf16'] / 1e9:.0f}")


def mfu_peak(result: dict | None, upfront: float) -> dict:
    """The peak a recipe's MFU divides by: the median of the probes interleaved with `result`'s steps, with their
    spread; the bf16 peak measured once up front where that run failed or has no probes (results saved before the
    probes existed, with --reuse-results)."""
    readings = [p["flops_per_s"] for p in ((result or {}).get("probes") or {}).get("readings", [])]
    if result is None or "error" in result or not readings:
        return {**peak_spread([upfront]), "interleaved": False, "dtype": "bfloat16"}
    return {**peak_spread(readings), "interleaved": True, "dtype": result["probes"]["dtype"]}


def peak_text(p: dict) -> str:
    """A peak as the report prints it beside MFU: its value, where it comes from, and its spread."""
    if not p["interleaved"]:
        return f"{p['dtype']} peak {p['median'] / 1e9:.0f} GFLOP/s, measured once up front"
    return (f"{p['dtype']} peak {p['median'] / 1e9:.0f} GFLOP/s, median of {p['n']} probes interleaved with the steps; "
            f"spread {p['min'] / 1e9:.0f}-{p['max'] / 1e9:.0f}, max/min {p['max_over_min']:.2f}")


def resolve_base() -> str:
    from collegeadvisor.models import resolve_base_model

    return resolve_base_model(BASE)


def report(args, mach, vers, data, peaks, mfu_peaks, f_smol, f_tl, results, vs_seed, vs_trl, mfus, rss, wall) -> str:
    ok = lambda r: r is not None and "error" not in r  # noqa: E731
    met = lambda good: "n/a" if good is None else ("met" if good else "**not met**")  # noqa: E731
    import torch

    threads = torch.get_num_threads()
    mfu, mfu_tl, amx = mfus
    goal_smol, goal_tl = GOALS["mfu"][amx]
    mp_smol, mp_tl = mfu_peaks["smol"], mfu_peaks["tl"]
    names = {"seed": "seed: HF Trainer, pad to 512, fp32", "trl": "TRL SFTTrainer defaults",
             "ours": "ours (defaults)", "ours-long": "ours, batch 4 x 512 (the longest examples)",
             "ours-tinyllama": "ours, TinyLlama-1.1B-shaped",
             **{name: "ours, " + ", ".join(f"{k} {v}" for k, v in change.items()) for name, change in LEVERS.items()},
             "ours-glibc": "ours, glibc malloc"}
    lines = [
        f"`python bench/train_throughput.py{' --quick' if args.quick else ''}`"
        f"{' (--steps ' + str(args.steps) + ')' if args.steps else ''}"
        f"{', report rebuilt from saved results' if args.reuse_results else f', {wall / 60:.1f} min'}. "
        f"{mach['cpu']}, {mach['cores']} cores, {mach.get('memory_gb', 0):.0f} GB, CPU flags: "
        f"{', '.join(mach['flags']) or 'no avx512/amx'}"
        + (f" (oneDNN capped at {args.max_isa}: ONEDNN_MAX_CPU_ISA, for the probes and every recipe)" if args.max_isa
           else "") + "; " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".",
        "",
        f"Data: the Scorecard dataset as the quickstart builds it ({data['examples']:,} examples, each answered "
        f"from up to three retrieved rows); the {data['epoch']['n']:,} that fit {MAX_LENGTH} tokens are one epoch "
        f"({data['epoch']['tokens']:,} real tokens). Every recipe draws its batches from the same seeded "
        f"{data['subset']['n']} of them ({data['subset']['min']}-{data['subset']['max']} tokens, mean "
        f"{data['subset']['mean']:.0f}), each for the steps shown in the last column (ours: one pass); step "
        "1 is warm-up, not timed. The seed's steps all cost 4 x 512 whatever the lengths, so its tokens/s is 4 x the "
        "epoch's mean real tokens per example / its mean step time (its own few batches would make it noisy). Model: SmolLM2-135M-Instruct; LoRA r 16, "
        "alpha 32, dropout 0 on every linear layer, for all recipes (ours' defaults).",
        "",
        f"| recipe | real tokens/s | x seed | s/epoch | peak RSS | RSS training | final loss | MFU ({mp_smol['dtype']}) "
        "| timed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    seed = results.get("seed")
    for name, r in results.items():
        if name == "ours-profile":
            continue
        label = names.get(name, name)
        if not ok(r):
            lines.append(f"| {label} | failed: {r['error']} | | | | | | | |")
            continue
        x = r["tokens_per_s"] / seed["tokens_per_s"] if ok(seed) and "tinyllama" not in name else None
        lines.append(
            f"| {label} | {r['tokens_per_s']:.0f} | {fmt(x, '.1f')} | {fmt(r['s_per_epoch'] / 60, ',.0f')} min | "
            f"{r['peak_rss_gb']:.2f} GB | {r['train_rss_gb']:.2f} GB | {fmt(r['final_loss'], '.3f')} | "
            f"{r['mfu_bf16']:.1%} | {r['timed_steps']} steps, {r['timed_tokens']:,} tokens, {r['timed_s']:.0f} s"
            + (f" ({r['measured_tokens_per_s']:.0f} tokens/s on these batches)" if "measured_tokens_per_s" in r else "")
            + (f"; {r['probe_s_excluded']:.1f} s of probes left out" if r.get("probe_s_excluded") else "")
            + " |")
    lines += ["", "Settings as run:", ""]
    lines += [f"- {names.get(n, n)}: {r['settings']}, {r.get('allocator', 'glibc')} malloc" for n, r in results.items()
              if ok(r) and n != "ours-profile"]
    lines += [
        "",
        f"MFU's peak (torch matmul at 2048x576 @ 576x1536, the run's {threads} threads, in the dtype it computes in): "
        f"{peak_text(mp_smol)}"
        + (f" (quartiles {mp_smol['q1'] / 1e9:.0f}-{mp_smol['q3'] / 1e9:.0f})" if mp_smol["interleaved"] else "")
        + f"; every SmolLM2-shaped row divides by it. TinyLlama row, at 2048x2048 @ 2048x5632: {peak_text(mp_tl)}. "
        "The probes ran inside ours' training loop, one before the first step and the rest after steps spread over "
        "the run, so they met the same machine as the steps; their time is left out of tokens/s. "
        f"Measured once up front, before the recipes (for reference): bf16 "
        f"{peaks['smol_bf16'] / 1e9:.0f} GFLOP/s at 2048x576 @ 576x1536, fp32 {peaks['smol_fp32'] / 1e9:.0f}; bf16 "
        f"{peaks['tl_bf16'] / 1e9:.0f} at TinyLlama's 2048x2048 @ 2048x5632. FLOPs per real token (formula in the "
        f"script's docstring): SmolLM2 {f_smol['per_token'] / 1e9:.3f} G (linear {f_smol['parts']['linear'] / 1e9:.3f}, "
        f"LoRA {f_smol['parts']['lora'] / 1e9:.3f}, attention {f_smol['parts']['attention'] / 1e9:.3f}, head at "
        f"labelled positions {f_smol['parts']['head'] / 1e9:.3f}); TinyLlama-shaped {f_tl['per_token'] / 1e9:.2f} G. "
        f"At MFU's peaks that is a ceiling of {mp_smol['median'] / f_smol['per_token']:,.0f} tokens/s for "
        f"SmolLM2 and {mp_tl['median'] / f_tl['per_token']:,.0f} for the TinyLlama shape.",
        "",
        "| goal | measured | |",
        "| --- | --- | --- |",
        f"| >= {GOALS['vs_seed']:.0f}x the seed recipe, real tokens/s | {fmt(vs_seed, '.2f')}{'x' * (vs_seed is not None)} | "
        f"{met(None if vs_seed is None else vs_seed >= GOALS['vs_seed'])} |",
        f"| >= {GOALS['vs_trl']:.0f}x TRL SFTTrainer defaults | {fmt(vs_trl, '.2f')}{'x' * (vs_trl is not None)} | "
        f"{met(None if vs_trl is None else vs_trl >= GOALS['vs_trl'])} |",
        f"| >= {goal_smol:.0%} of the {mp_smol['dtype']} matmul peak, SmolLM2 ({'with' if amx else 'no'} AMX) | "
        f"MFU {fmt(mfu, '.1%')} ({peak_text(mp_smol)}) | {met(None if mfu is None else mfu >= goal_smol)} |",
        f"| >= {goal_tl:.0%} of the {mp_tl['dtype']} matmul peak, TinyLlama shape | "
        f"MFU {fmt(mfu_tl, '.1%')} ({peak_text(mp_tl)}) | {met(None if mfu_tl is None else mfu_tl >= goal_tl)} |",
        f"| peak RSS <= {GOALS['rss_gb']:.0f} GB at the default settings (ours and ours at 4 x 512) | "
        f"{fmt(rss, '.2f')}{' GB' * (rss is not None)} | "
        f"{met(None if rss is None else rss <= GOALS['rss_gb'])} |",
    ]
    prof = results.get("ours-profile")
    if ok(prof) and prof.get("profile"):
        p = prof["profile"]
        lines += [
            "",
            f"Profile of ours ({prof['steps']} steps under torch.profiler, which slows it): operator self time "
            f"{p['total_s']:.1f} s, of which {p['matmul_share']:.0%} in matmul and attention kernels.",
            "",
            "| operator | self time | share | calls |",
            "| --- | --- | --- | --- |",
        ] + [f"| `{row['op']}` | {row['self_s']:.2f} s | {row['share']:.1%} | {row['calls']} |" for row in p["top"]]
    elif prof is not None and not ok(prof):
        lines += ["", f"Profile failed: {prof['error']}"]
    lines += [
        "",
        "Notes: final losses are not comparable across recipes: TRL's and the seed's cover every token (prompt "
        "included) and TRL's default learning rate is 2e-5; ours covers assistant tokens. `peak RSS` is the whole "
        "process (imports, data and model load); `RSS training` is the peak sampled after the model was ready. The "
        "TinyLlama-shaped model is built with random fp32 weights (as `load_model` loads on CPU) before the recipe "
        "casts the frozen base to bf16, so its peak includes that fp32 copy. The seed recipe is not run on the "
        "TinyLlama shape: fp32 activations at 4 x 512 took 23 GB of RSS and 70 s a step in a trial here.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps per recipe (about 8 minutes on a quiet 2-core machine)")
    ap.add_argument("--examples", type=int, default=None, help="size of the seeded subset every recipe draws from")
    ap.add_argument("--steps", type=int, default=None, help="cap every recipe at this many optimizer steps (smoke)")
    ap.add_argument("--data-dir", default="/tmp/train-throughput/data")
    ap.add_argument("--workdir", default="/tmp/train-throughput/work")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per recipe before it counts as failed")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled run of ours")
    ap.add_argument("--max-isa", default=None, metavar="ISA",
                    help="cap oneDNN's instruction set (ONEDNN_MAX_CPU_ISA), e.g. AVX512_CORE_BF16: the no-AMX MFU goal "
                         "measured on an AMX machine")
    ap.add_argument("--reuse-results", action="store_true",
                    help="report from the recipes' results already in --workdir instead of running them again")
    # one recipe in this process (the parent runs these)
    ap.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tinyllama", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--long", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--grad-accum", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-shape", default=None, help=argparse.SUPPRESS)  # M,K,N: interleave matmul probes
    args = ap.parse_args()
    if args.max_isa:  # before torch loads; the recipes inherit it
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.max_isa
    if args.recipe:
        args.workdir = Path(args.workdir)
        run_child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
