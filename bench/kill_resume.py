"""Kill anywhere, resume exactly: SIGKILL the real `collegeadvisor` commands at chosen and random moments, rerun
them, and compare the end result with an uninterrupted run.

- train:   a tiny model, 30 steps, a checkpoint every step; kills inside the loop at random steps and while a
           checkpoint is being written; every --resume must give the uninterrupted run's loss at every step (exactly)
           and the same adapter bytes. SIGTERM and Ctrl-C (SIGINT) must save a checkpoint and exit 143 / 130.
- dataset: `data scorecard`; kills at random moments and while its files are written.
- kb:      `kb build` of a slice of the Scorecard table, killed mid-batch; same ids, documents, metadata and vectors.
- export:  `export --to merged`; killed at random and while the folder is written; the same files, byte for byte.

After every kill, whatever is published must be complete: every listed checkpoint verifies, a dataset file is
byte-equal to the uninterrupted one, an export folder is complete.

    python bench/kill_resume.py train --kills 5 --steps 30
    python bench/kill_resume.py all --work /tmp/kills
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builders of the test suite (conftest, helpers)

POLL_S = 0.002
MIN_COSINE = 0.9999  # kb vectors of a resumed build vs an uninterrupted one (see kb_kills)


# ------------------------------------------------------------------------------------------ processes
def cli(*args) -> list[str]:
    return [sys.executable, "-m", "collegeadvisor.cli", *map(str, args)]


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Proc:
    """A command in its own process group, its output in a log file."""

    def __init__(self, cmd: list[str], log: Path, cwd: Path):
        self.log = log
        self.offset = log.stat().st_size if log.is_file() else 0  # output() is this process's part of the log
        self.fh = open(log, "ab")
        self.p = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, cwd=cwd, env=child_env(),
                                  start_new_session=True)
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.p.poll() is None

    def output(self) -> str:
        with open(self.log, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> bool:
        """SIGKILL the whole group; True if it was still running (a real kill, not a finished process)."""
        was_alive = self.alive()
        self.signal(signal.SIGKILL)
        self.p.wait()
        self.fh.close()
        return was_alive

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            self.fh.close()


def wait_for(pred: Callable[[], bool], proc: Proc, timeout: float = 300) -> bool:
    """Poll pred() until true (True) or the process ended / timed out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if not proc.alive():
            return pred()
        time.sleep(POLL_S)
    return False


def run_ok(cmd: list[str], log: Path, cwd: Path) -> float:
    p = Proc(cmd, log, cwd)
    rc = p.wait()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{p.output()[-3000:]}")
    return time.monotonic() - p.started


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every published file under folder (hidden staging/temporary names excluded)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def staged(folder: Path, prefix: str, pid: int | None = None) -> bool:
    """A staging folder or temporary file whose name starts with `.{prefix}` (and, given pid, carries that
    writer's pid) exists in folder."""
    return folder.is_dir() and any(p.name.startswith(f".{prefix}") and p.name.endswith(".tmp")
                                   and (pid is None or f".{pid}." in p.name) for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ fixtures
def tiny_base(root: Path) -> Path:
    """A 2-layer random Llama on a small TinyLlama-style tokenizer (tests/conftest.py builds it in seconds)."""
    model = root / "tiny-base"
    if not (model / "config.json").is_file():
        from conftest import build_tiny_model, build_tinyllama_tokenizer

        build_tiny_model(build_tinyllama_tokenizer(root / "tiny-tok"), model)
    return model


def tiny_data(root: Path, n: int = 48) -> Path:
    from helpers import advisor_rows, write_jsonl

    path = root / "data.jsonl"
    if not path.is_file():
        write_jsonl(path, advisor_rows(n))
    return path


def train_args(root: Path, steps: int) -> list:
    return ["--base-model", tiny_base(root), "--data", tiny_data(root), "--output-dir", root / "runs",
            "--max-steps", steps, "--batch-size", 4, "--grad-accum", 1, "--learning-rate", "1e-2", "--sample-every", 0,
            "--save-every", 1, "--log-every", 1, "--val-fraction", "0.1", "--lora-dropout", "0.1", "--num-threads", 1,
            "--force"]


def metric_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line a kill cut short
    return rows


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(run) if "loss" in r}


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in metric_rows(run) if "val_loss" in r}


def checkpoints_intact(run: Path) -> int:
    """Every checkpoint that looks finished verifies (sha256, no symlink); returns how many there are."""
    from collegeadvisor.train import checkpoint

    found = checkpoint.checkpoints(run)
    for c in found:
        checkpoint.verify(c, run)
    return len(found)


# ------------------------------------------------------------------------------------------ train
def train_reference(root: Path, steps: int) -> Path:
    run = root / "runs" / "straight"
    if not (run / "adapter").is_dir():
        run_ok(cli("train", *train_args(root, steps), "--run-name", "straight"), root / "straight.log", root)
    return run


def compare_runs(ref: Path, run: Path, steps: int) -> dict:
    a, b = losses(ref), losses(run)
    diffs = [abs(a[s] - b[s]) for s in range(1, steps + 1) if s in a and s in b]
    adapter = "adapter/adapter_model.safetensors"
    same_adapter = (tree_hashes(ref).get(adapter) == tree_hashes(run).get(adapter) is not None)
    manifest = json.loads((run / "manifest.json").read_text())
    return {"steps_compared": len(diffs), "max_loss_diff": max(diffs) if diffs else None,
            "exact": len(diffs) == steps and max(diffs) == 0.0 and val_losses(ref) == val_losses(run) and same_adapter
            and manifest["status"] == "complete",
            "same_adapter_bytes": same_adapter, "same_val_loss": val_losses(ref) == val_losses(run)}


def _kill_train(proc: Proc, run: Path, mode: str, target: int, rng: random.Random, resumed: bool) -> dict:
    """Wait for the moment `mode` names, SIGKILL; what was killed where."""
    ready = (lambda: "resumed from" in proc.output() or "train:" in proc.output()) if resumed else (lambda: True)
    wait_for(ready, proc)
    if mode == "checkpoint-write":  # the staging folder of checkpoint `target` exists: the write is under way
        hit = wait_for(lambda: staged(run / "checkpoints", f"step-{target:06d}"), proc)
    else:  # a random moment within step `target`
        hit = wait_for(lambda: len(losses(run)) >= target, proc)
        time.sleep(rng.uniform(0, 0.03))
    killed = proc.kill() and hit
    mid_write = staged(run / "checkpoints", "step-", proc.p.pid)  # its staging folder was left: killed mid-write
    return {"mode": mode, "target_step": target, "killed": killed, "mid_checkpoint_write": mid_write,
            "logged_steps": len(losses(run)), "intact_checkpoints": checkpoints_intact(run)}


def train_kills(root: Path, kills: int = 5, steps: int = 30, seed: int = 0, log=print) -> dict:
    """SIGKILL a training run `kills` times (inside steps and during checkpoint writes), resume after each, and
    compare every step's loss, the validation losses and the adapter bytes with an uninterrupted run."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    ref = train_reference(root, steps)
    run = root / "runs" / f"killed-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    modes = [("checkpoint-write" if i % 2 == 0 else "random") for i in range(kills)]
    targets = sorted(rng.sample(range(2, steps), kills)) if steps - 2 >= kills * 3 else list(range(2, 2 + kills))
    events = []
    for i, (mode, target) in enumerate(zip(modes, targets)):
        cmd = cli("train", "--resume", run) if i else cli("train", *train_args(root, steps), "--run-name", run.name)
        proc = Proc(cmd, root / f"{run.name}.log", root)
        event = _kill_train(proc, run, mode, target, rng, resumed=i > 0)
        events.append(event)
        log(f"  train kill {i + 1}: {event}")
    rc = Proc(cli("train", "--resume", run), root / f"{run.name}.log", root).wait()
    result = compare_runs(ref, run, steps) if rc == 0 else {"exact": False, "error": f"final resume exited {rc}"}
    result.update(kills=sum(e["killed"] for e in events), events=events,
                  mid_write=sum(e["mid_checkpoint_write"] for e in events))
    return result


def signal_stops(root: Path, steps: int = 30, log=print) -> dict:
    """SIGTERM at one step and SIGINT (Ctrl-C) at a later one: each must save a checkpoint at the step it stopped,
    mark the run paused and exit 128+signal; the resumed run must equal an uninterrupted one."""
    ref = train_reference(root, steps)
    run = root / "runs" / "signalled"
    shutil.rmtree(run, ignore_errors=True)
    results = []
    for i, (sig, at) in enumerate([(signal.SIGTERM, steps // 3), (signal.SIGINT, 2 * steps // 3)]):
        cmd = cli("train", "--resume", run) if i else cli("train", *train_args(root, steps), "--run-name", run.name)
        proc = Proc(cmd, root / f"{run.name}.log", root)
        if i:
            wait_for(lambda: "resumed from" in proc.output(), proc)
        wait_for(lambda: len(losses(run)) >= at, proc)
        proc.signal(sig)
        rc = proc.wait(120)
        manifest = json.loads((run / "manifest.json").read_text())
        from collegeadvisor.train import checkpoint

        last = checkpoint.checkpoints(run)[-1]
        ok = (rc == 128 + sig and manifest["status"] == "paused" and manifest.get("stopped_by") == sig.name
              and int(last.name.split("-")[1]) == max(losses(run)) and "Traceback" not in proc.output())
        results.append({"signal": sig.name, "exit_code": rc, "paused_at": max(losses(run)), "ok": ok})
        log(f"  {sig.name}: {results[-1]}")
    rc = Proc(cli("train", "--resume", run), root / f"{run.name}.log", root).wait()
    cmp = compare_runs(ref, run, steps) if rc == 0 else {"exact": False}
    return {"stops": results, "ok": all(r["ok"] for r in results) and cmp["exact"], **cmp}


# ------------------------------------------------------------------------------------------ dataset, kb, export
def _kill_rerun(name: str, root: Path, cmd: list[str], out: Path, kills: int, write_marker: Callable[[], bool],
                check_published: Callable[[], str | None], compare: Callable[[], dict], rng: random.Random,
                duration: float, log=print) -> dict:
    """Start `cmd`, SIGKILL it (alternately at a random moment and when write_marker() shows a write under way),
    check what is published, rerun; after `kills` real kills, a last rerun runs to completion."""
    events, attempts = [], 0
    while sum(e["killed"] for e in events) < kills and attempts < kills * 4:
        attempts += 1
        proc = Proc(cmd, root / f"{name}.log", root)
        mode = "write" if len(events) % 2 == 0 else "random"
        if mode == "write":
            wait_for(write_marker, proc)
        else:
            wait_for(lambda: time.monotonic() - proc.started > rng.uniform(0.2, 0.95) * duration, proc)
        killed = proc.kill()
        problem = check_published()
        events.append({"mode": mode, "killed": killed, "published_ok": problem is None, "problem": problem})
        log(f"  {name} kill {len(events)}: {events[-1]}")
    rc = Proc(cmd, root / f"{name}.log", root).wait()
    result = compare() if rc == 0 else {"same": False, "error": f"rerun exited {rc}"}
    kills_done = sum(e["killed"] for e in events)
    result.update(kills=kills_done, events=events,
                  ok=result.get("same", False) and all(e["published_ok"] for e in events) and kills_done >= kills)
    return result


def dataset_kills(root: Path, kills: int = 3, seed: int = 0, n: int = 4000, log=print) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    args = ["--n", n, "--heldout", 200, "--seed", seed]
    ref, out = root / "dataset-ref", root / "dataset-killed"
    duration = run_ok(cli("data", "scorecard", "--out", ref, *args), root / "dataset-ref.log", root)
    want = tree_hashes(ref)

    def published() -> str | None:
        got = tree_hashes(out) if out.is_dir() else {}
        bad = [k for k, v in got.items() if want.get(k) != v]
        return f"{bad[0]} differs from the uninterrupted build" if bad else None

    return _kill_rerun("dataset", root, cli("data", "scorecard", "--out", out, *args), out, kills,
                       lambda: staged(out, "scorecard.jsonl") or staged(out, "heldout.jsonl"), published,
                       lambda: {"same": tree_hashes(out) == want, "files": len(want),
                                "rows": sum(1 for _ in (out / "scorecard.jsonl").open())},
                       random.Random(seed), duration, log)


def store_snapshot(path: Path) -> dict:
    """Ids, documents, metadata and vectors of a Chroma store, ordered by id."""
    import numpy as np

    from collegeadvisor.kb import open_store

    got = open_store(path).get(include=["documents", "metadatas", "embeddings"])
    order = sorted(range(len(got["ids"])), key=lambda i: got["ids"][i])
    text = json.dumps([[got["ids"][i], got["documents"][i], got["metadatas"][i]] for i in order], sort_keys=True)
    return {"ids": [got["ids"][i] for i in order], "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
            "vectors": np.asarray(got["embeddings"])[order] if order else np.zeros((0, 0))}


def kb_kills(root: Path, kills: int = 3, seed: int = 0, limit: int = 3000, batch: int = 200, log=print) -> dict:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    args = ["--limit", limit, "--batch-size", batch]
    ref, out = root / "kb-ref", root / "kb-killed"
    duration = run_ok(cli("kb", "build", "--path", ref, *args), root / "kb-ref.log", root)
    want = store_snapshot(ref)
    proc_log = root / "kb.log"

    def mid_batch() -> bool:  # the progress bar moved past its first batch in the current attempt's output
        text = proc_log.read_text(errors="replace") if proc_log.is_file() else ""
        tail = text.rsplit("kb build:", 1)[-1] if "kb build:" in text else ""
        return "/" in tail and not tail.lstrip().startswith("0%")

    def compare() -> dict:
        """Ids, documents and metadata exactly; vectors by cosine: the embedder runs in bf16 where the CPU has it,
        and a text embedded in another batch (a resumed build batches what is left) differs in the last bits."""
        got = store_snapshot(out)
        shape_ok = got["vectors"].shape == want["vectors"].shape
        cosine = float((got["vectors"] * want["vectors"]).sum(1).min()) if shape_ok and len(got["ids"]) else None
        return {"same": got["ids"] == want["ids"] and got["text_sha256"] == want["text_sha256"]
                and cosine is not None and cosine >= MIN_COSINE,
                "rows": len(got["ids"]), "duplicates": len(got["ids"]) - len(set(got["ids"])),
                "missing": len(set(want["ids"]) - set(got["ids"])), "min_vector_cosine": cosine,
                "identical_vectors": bool(shape_ok and np.array_equal(got["vectors"], want["vectors"]))}

    def marker() -> bool:
        if not mid_batch():
            return False
        time.sleep(random.Random(seed).uniform(0, 0.3))  # somewhere inside a later batch
        return True

    proc_log.unlink(missing_ok=True)
    return _kill_rerun("kb", root, cli("kb", "build", "--path", out, *args), out, kills, marker, lambda: None,
                       compare, random.Random(seed), duration, log)


def export_kills(root: Path, kills: int = 3, seed: int = 0, log=print) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    run = train_reference(root, 30)
    ref, out = root / "export-ref", root / "export-killed"
    duration = run_ok(cli("export", "--run", run, "--to", "merged", "--out", ref), root / "export-ref.log", root)
    want = tree_hashes(ref)

    def published() -> str | None:
        if not out.exists():
            return None
        got = tree_hashes(out)
        return None if got == want else f"{out} is published but differs from the uninterrupted export"

    return _kill_rerun("export", root, cli("export", "--run", run, "--to", "merged", "--out", out), out, kills,
                       lambda: staged(out.parent, out.name), published,
                       lambda: {"same": tree_hashes(out) == want, "files": len(want)},
                       random.Random(seed), duration, log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "signals", "dataset", "kb", "export", "all"])
    ap.add_argument("--work", default=None, help="scratch folder [default: a new temporary one]")
    ap.add_argument("--kills", type=int, default=None)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = Path(args.work or tempfile.mkdtemp(prefix="collegeadvisor-kills-"))
    jobs = {"train": lambda: train_kills(root, args.kills or 5, args.steps, args.seed),
            "signals": lambda: signal_stops(root, args.steps),
            "dataset": lambda: dataset_kills(root, args.kills or 3, args.seed),
            "kb": lambda: kb_kills(root, args.kills or 3, args.seed),
            "export": lambda: export_kills(root, args.kills or 3, args.seed)}
    chosen = list(jobs) if args.what == "all" else [args.what]
    results = {name: jobs[name]() for name in chosen}
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
