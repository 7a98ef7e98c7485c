"""Atomic checkpoints: adapter, optimizer, scheduler, RNG and data position, written to a staging folder and
renamed into place, so an interruption leaves the previous checkpoint intact."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from collegeadvisor.fsutil import atomic_replace_dir, staging_dir

STATE = "trainer_state.pt"


def checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    found = [d for d in root.glob("step-*") if (d / STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model, optimizer, scheduler, progress: dict, keep: int) -> Path:
    final = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    stage = staging_dir(final)
    try:
        model.save_pretrained(stage / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "progress": progress}, stage / STATE)
        atomic_replace_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, model, optimizer, scheduler) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(Path(path) / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    blob = torch.load(Path(path) / STATE, weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return blob["progress"]
