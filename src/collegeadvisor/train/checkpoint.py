"""Atomic checkpoints: adapter, optimizer, scheduler, RNG and data position, written to a staging folder, fsynced
and renamed into place, so an interruption (a kill, a full disk, a power cut) leaves the previous checkpoint intact.

Nothing here is a pickle: tensors go to safetensors files, everything else to `trainer_state.json`, which also
lists the sha256 of every file of the checkpoint. Loading checks those hashes and refuses symlinks and paths that
lead out of the run folder; a checkpoint that fails is skipped for the one before it, with the reason printed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as tensors_to_bytes

from collegeadvisor.errors import ManifestError
from collegeadvisor.fsutil import (
    WriteError,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_jsonl,
    clean_stale_staging,
    describe,
    staging_dir,
)
from collegeadvisor.integrity import check_inside, file_hashes, verify_hashes

STATE = "trainer_state.json"
TENSORS = "trainer_tensors.safetensors"
LEGACY_STATE = "trainer_state.pt"  # pickles written by versions before 0.2: never loaded
FORMAT = 1
STEP_PREFIX = "step-"


def _step_of(d: Path) -> int | None:
    tail = d.name[len(STEP_PREFIX):]
    return int(tail) if d.name.startswith(STEP_PREFIX) and tail.isdigit() else None


def checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoint folders (step-NNNNNN holding trainer_state.json), oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = [d for d in root.iterdir() if _step_of(d) is not None and (d / STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=_step_of)


# ------------------------------------------------------------------------------------------ state <-> JSON
def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for a state dict; tensors and arrays go to `tensors` under `key`. Tuples and non-string keys keep
    their type; anything else that JSON cannot hold is an error, never a silent str()."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "iu"
                                                                           else np.float64))
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
        return {"__items__": [[_encode(k, f"{key}.k{i}", tensors), _encode(v, f"{key}.{i}", tensors)]
                              for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {key}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}


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


# ------------------------------------------------------------------------------------------ save
def save(run_dir: Path, step: int, model, optimizer, scheduler, progress: dict, keep: int) -> Path:
    """checkpoints/step-NNNNNN: adapter/ (safetensors), trainer_tensors.safetensors and trainer_state.json (with
    the sha256 of every other file); staged, fsynced, renamed into place; then all but the last `keep` go."""
    final = Path(run_dir) / "checkpoints" / f"{STEP_PREFIX}{step:06d}"
    before = checkpoints(run_dir)
    kept = f"the previous checkpoint {before[-1]} is intact" if before else "no earlier checkpoint was written"
    try:
        stage = staging_dir(final)
    except WriteError as exc:
        raise WriteError(f"cannot write checkpoint {final}: {exc.cause}; {kept}", final, exc.cause) from exc
    try:
        _write_checkpoint(stage, final, model, optimizer, scheduler, progress)
    except (OSError, WriteError, SafetensorError) as exc:  # safetensors reports a failed write as its own error
        shutil.rmtree(stage, ignore_errors=True)
        cause, path = (exc.cause, exc.path) if isinstance(exc, WriteError) else (describe(exc), getattr(exc, "filename", None))
        where = f" ({Path(path).relative_to(stage)})" if path and _under(path, stage) else ""
        raise WriteError(f"cannot write checkpoint {final}{where}: {cause}; {kept}", final, cause) from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    prune(run_dir, keep)
    return final


def _under(path, folder: Path) -> bool:
    try:
        Path(path).relative_to(folder)
        return True
    except ValueError:
        return False


def _write_checkpoint(stage: Path, final: Path, model, optimizer, scheduler, progress: dict) -> None:
    model.save_pretrained(stage / "adapter")
    tensors: dict[str, torch.Tensor] = {}
    state = {"format": FORMAT, "optimizer": _encode(optimizer.state_dict(), "optimizer", tensors),
             "scheduler": _encode(scheduler.state_dict(), "scheduler", tensors),
             "rng": _encode(rng_state(), "rng", tensors), "progress": _encode(progress, "progress", tensors)}
    atomic_write_bytes(stage / TENSORS, tensors_to_bytes(tensors))
    state["files"] = file_hashes(stage)
    atomic_write_bytes(stage / STATE, (json.dumps(state) + "\n").encode())
    atomic_replace_dir(stage, final)


def prune(run_dir: Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints: each is renamed aside first (one atomic step), so a kill
    mid-removal never leaves a half-deleted folder that looks like a checkpoint."""
    for old in checkpoints(run_dir)[:-keep]:
        trash = old.with_name(f".{old.name}.{os.getpid()}.trash.tmp")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


# ------------------------------------------------------------------------------------------ load
def verify(path: Path, run_dir: Path) -> dict:
    """The decoded-free JSON state of an intact checkpoint, or ManifestError saying what is wrong with it."""
    path = Path(path)
    check_inside(path, run_dir)
    if (path / LEGACY_STATE).exists() and not (path / STATE).exists():
        raise ManifestError(f"{path / LEGACY_STATE}: a pickle written by an older version; it is never loaded "
                            "(unpickling runs code); start a new run")
    state_file = path / STATE
    check_inside(state_file, run_dir)
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{state_file}: unreadable checkpoint state ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("files"), dict):
        raise ManifestError(f"{state_file}: not a checkpoint state this version writes")
    for need in (TENSORS, "adapter/adapter_model.safetensors"):
        if need not in state["files"]:
            raise ManifestError(f"{state_file}: lists no {need}")
    verify_hashes(path, state["files"], run_dir)
    return state


def load(path: Path, model, optimizer, scheduler, run_dir: Path | None = None) -> dict:
    """Restore adapter weights, optimizer, scheduler and RNG from a verified checkpoint; returns its progress."""
    from peft import set_peft_model_state_dict  # peft (heavy): loaded with the model, not with this module

    path = Path(path)
    state = verify(path, run_dir or path.parent.parent)
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    tensors = load_file(str(path / TENSORS))
    optimizer.load_state_dict(_decode(state["optimizer"], tensors))
    scheduler.load_state_dict(_decode(state["scheduler"], tensors))
    set_rng_state(_decode(state["rng"], tensors))
    return _decode(state["progress"], tensors)


def resume(run_dir: Path, model, optimizer, scheduler, log: Callable[[str], None] = print,
           main: bool = True) -> tuple[dict, Path | None]:
    """Load the newest intact checkpoint (a damaged or tampered one is skipped, with the reason); the main process
    also trims the run's logs to that step and removes what a killed writer left. (progress, checkpoint), or
    ({}, None) when no checkpoint was written yet."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if main:
        clean_stale_staging(root)  # staging folders and trash of a writer that was killed
    found = checkpoints(run_dir)
    legacy = [d for d in root.iterdir() if (d / LEGACY_STATE).exists()] if root.is_dir() else []
    if not found and legacy:
        verify(legacy[-1], run_dir)  # raises the clear "pickle from an older version" error
    problems = []
    for ckpt in reversed(found):
        try:
            progress = load(ckpt, model, optimizer, scheduler, run_dir)
        except ManifestError as exc:
            problems.append(str(exc))
            log(f"warning: skipping checkpoint {ckpt.name}: {exc}")
            continue
        if main:
            trim_logs(run_dir, progress["step"])
        return progress, ckpt
    if problems:
        raise ManifestError(f"{run_dir}: no intact checkpoint to resume from ({problems[0]})")
    if main:
        trim_logs(run_dir, 0)
    return {}, None


def trim_log(path: Path, step: int) -> None:
    """Keep the lines of a metrics/samples log up to `step` (a resumed run writes the rest again), dropping a
    line a kill cut short."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(row)
    atomic_write_jsonl(path, kept)


def trim_logs(run_dir: Path, step: int) -> None:
    for name in ("metrics.jsonl", "samples.jsonl"):
        trim_log(Path(run_dir) / name, step)


# ------------------------------------------------------------------------------------------ signals
class StopRequest:
    """SIGINT/SIGTERM caught as a request: the loop finishes its step, saves a checkpoint and exits (128 + the
    signal's number). A second signal interrupts at once. Installed on the main thread of a single process only
    (under DDP every rank would have to agree on the step)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    @classmethod
    def install(cls, enabled: bool = True, log: Callable[[str], None] = print) -> StopRequest:
        stop = cls()
        if not enabled or threading.current_thread() is not threading.main_thread():
            return stop

        def handler(signum, frame):
            if stop.signal is not None:
                raise KeyboardInterrupt
            stop.signal = signum
            log(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                "(send it again to stop at once)")

        stop._previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return stop

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signal).name if self.signal else None


def exit_code(manifest: dict) -> int:
    """128 + the signal that stopped a run (the shell's convention), else 0."""
    name = manifest.get("stopped_by")
    return 128 + int(signal.Signals[name]) if name in signal.Signals.__members__ else 0
