"""One training step's parts, shared by the recipe and check's measured step (its ETA): the model as the plan builds
it (LoRA in the plan's precision, the loss at labelled positions, the plan's autocast), a step's examples as forward
passes, the guards on a step's loss and gradient norm, and the timing of its passes."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from collegeadvisor.config import Config
from collegeadvisor.errors import TrainingError
from collegeadvisor.models import load_model
from collegeadvisor.train.batching import forward_batches
from collegeadvisor.train.model import LabelLoss, keep_base_in_bf16, lora_model
from collegeadvisor.train.planner import Plan, autocast_context, pass_tokens


def build_model(cfg: Config, resolved: str, p: Plan, device: str) -> tuple:
    """(model, loss, autocast): the base model with LoRA (lora_model) in the plan's precision, its LabelLoss and a
    factory of the plan's autocast contexts. The recipe adds the optimizer, torch.compile and DDP."""
    model = lora_model(load_model(resolved, dtype=p.dtype, device=device), cfg)
    if p.base_bf16:
        keep_base_in_bf16(model)
    return model, LabelLoss(model, fused=cfg.fused), autocast_context(device, p.autocast)


def passes_for(rows: list[dict], pad_id: int, cfg: Config) -> list[dict]:
    """A step's examples as forward passes (batching.forward_batches) of the plan's size, padded or packed."""
    return forward_batches(rows, pad_id, pass_tokens(cfg), cfg.packing, cfg.max_length, cfg.pad_to_multiple_of)


# ----------------------------------------------------------------------------------------------- guards
def check_finite(value: float, what: str, step: int, last_ckpt: Path | None, cfg: Config) -> None:
    if math.isfinite(value):
        return
    fp16 = cfg.dtype in ("fp16", "float16")
    hint = "fp16 overflows: use fp32 or bf16" if fp16 else f"lower learning_rate ({cfg.learning_rate})"
    kept = f"last checkpoint {last_ckpt} is intact" if last_ckpt else "no checkpoint was written yet"
    raise TrainingError(f"{what} is {value} at step {step}: training stopped before the update; {kept}; {hint}")


def check_collapse(loss: float, grad_norm: float, step: int, cfg: Config) -> None:
    if loss < cfg.collapse_loss and (grad_norm == 0 or not math.isfinite(grad_norm)):
        raise TrainingError(
            f"loss collapsed to {loss:.2e} with grad norm {grad_norm} at step {step}: the model is not learning "
            "(all labels masked, or NaN on MPS/fp16); this is a failure, not convergence"
        )


# ----------------------------------------------------------------------------------------------- timing
def sliver(batch: dict) -> list[dict]:
    """A warm-up pass before a timed one (one-time set-up and allocation): the batch's first row, 32 tokens."""
    return [{k: v[:1, :32] for k, v in batch.items()}]


def timed(passes: Callable[[list[dict]], object], batches: list[dict], device: str,
          clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds that passes(batches) takes, a CUDA device synchronized before the clock is read at the end."""
    start = clock()
    passes(batches)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return clock() - start
