"""Faults on disk and hostile files, each a scenario that returns what happened.

Disk faults: ENOSPC or EIO injected into the writes of a checkpoint (inside a real training run), a manifest, a
dataset, a metrics log and an export (Python-level injection at os.write / os.fsync, the calls fsutil makes), and
real operating-system faults (a file-size limit, EFBIG) under `kb build` and under a training run. Each must end
with an error naming the path and the cause, the previous good state intact and readable, and (where a rerun
applies) a rerun that ends exactly like an uninterrupted run.

Hostile files: pickles that would run code (a legacy checkpoint state, an adapter .bin, an export .bin, a pickle in
a knowledge base folder, a dataset that is a pickle), tampered hashes, symlinks out of a run, a checkpoint that
lists a path out of its folder, an edited manifest, an export naming a file outside itself. Each must be refused
with a clear message, and no pickle may run.

    python bench/faults.py --work /tmp/faults
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kill_resume  # noqa: E402  (tiny fixtures, subprocess helpers)

from collegeadvisor.errors import AdvisorError  # noqa: E402

MARKER_NAME = "PICKLE-RAN"


# ------------------------------------------------------------------------------------------ injection
def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""  # no /proc (macOS): every write matches


@contextmanager
def disk_fault(op: str, code: int, match: str = "", after: int = 0):
    """os.write ('write') or os.fsync ('fsync') fails with OSError(code) on files whose path contains `match`,
    after `after` matching calls succeed. Yields a dict counting the faults raised."""
    real = getattr(os, op)
    seen = {"calls": 0, "faults": 0}

    def faulty(fd, *args):
        path = _fd_path(fd)
        if match in path or not path:
            seen["calls"] += 1
            if seen["calls"] > after:
                seen["faults"] += 1
                raise OSError(code, os.strerror(code))
        return real(fd, *args)

    with mock.patch.object(os, op, faulty):
        yield seen


def _cause(code: int) -> str:
    return f"({errno.errorcode[code]})"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob(".*.tmp")) if Path(folder).exists() else []


# ------------------------------------------------------------------------------------------ fixtures
def tiny_cfg(root: Path, name: str, **kw):
    from collegeadvisor.config import load_config

    settings = dict(base_model=str(kill_resume.tiny_base(root)), data=str(kill_resume.tiny_data(root)),
                    output_dir=str(root / "runs"), max_steps=12, batch_size=4, grad_accum=1, learning_rate=1e-2,
                    sample_every=0, save_every=1, log_every=1, val_fraction=0.1, lora_dropout=0.1, run_name=name)
    settings.update(kw)
    return load_config(None, settings)


def straight_run(root: Path) -> Path:
    from collegeadvisor.train import train

    run = root / "runs" / "straight-inproc"
    if not (run / "adapter").is_dir():
        shutil.rmtree(run, ignore_errors=True)
        train(tiny_cfg(root, run.name), log=lambda *_: None)
    return run


def _result(name: str, group: str, ok: bool, message: str = "", **more) -> dict:
    return {"name": name, "group": group, "ok": bool(ok), "message": message.splitlines()[0] if message else "",
            **more}


# ------------------------------------------------------------------------------------------ disk: training
def training_fault(root: Path, code: int, op: str, match: str) -> dict:
    """A real training run whose writes to `match` fail from step 6 on: the error names the path and the cause, the
    checkpoints before stay intact, the manifest says failed, and --resume without the fault ends exactly like an
    uninterrupted run (loss at every step, adapter bytes)."""
    from collegeadvisor.runs import read_manifest
    from collegeadvisor.train import checkpoint, train

    ref = straight_run(root)
    name = f"fault-{op}-{errno.errorcode[code]}-{abs(hash(match)) % 10_000}"  # no `match` in the run's own path
    run = root / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    train(tiny_cfg(root, name, stop_after_steps=5), log=lambda *_: None)
    message = ""
    with disk_fault(op, code, match) as seen:
        try:
            train(tiny_cfg(root, name), resume=run, log=lambda *_: None)
        except AdvisorError as exc:
            message = str(exc)
    intact = [c.name for c in checkpoint.checkpoints(run)]
    for c in checkpoint.checkpoints(run):
        checkpoint.verify(c, run)
    failed = read_manifest(run)["status"] == "failed"
    train(tiny_cfg(root, name), resume=run, log=lambda *_: None)
    same = kill_resume.compare_runs(ref, run, 12)["exact"]
    ok = (seen["faults"] > 0 and _cause(code) in message and match.split("/")[-1] in message and failed
          and intact and not leftovers(run / "checkpoints") and same)
    return _result(f"training: {errno.errorcode[code]} at {op} of {match}", "disk", ok, message,
                   checkpoints_intact=intact, resumed_exact=same)


# ------------------------------------------------------------------------------------------ disk: files
def manifest_fault(root: Path, code: int, op: str) -> dict:
    from collegeadvisor.runs import read_manifest, write_manifest

    run = root / "manifest-fault"
    run.mkdir(parents=True, exist_ok=True)
    write_manifest(run, {"status": "running", "step": 1})
    before = (run / "manifest.json").read_bytes()
    message = ""
    with disk_fault(op, code, "manifest"):
        try:
            write_manifest(run, {"status": "complete", "step": 2})
        except AdvisorError as exc:
            message = str(exc)
    ok = ((run / "manifest.json").read_bytes() == before and read_manifest(run)["step"] == 1
          and str(run / "manifest.json") in message and _cause(code) in message and not leftovers(run))
    return _result(f"manifest: {errno.errorcode[code]} at {op}", "disk", ok, message)


def dataset_fault(root: Path, code: int, op: str) -> dict:
    from collegeadvisor.data.scorecard_qa import build_scorecard_dataset

    out = root / "dataset-fault"
    build_scorecard_dataset(out, n_examples=300, n_heldout=20, seed=1)
    before = kill_resume.tree_hashes(out)
    message = ""
    with disk_fault(op, code, "scorecard.jsonl"):
        try:
            build_scorecard_dataset(out, n_examples=400, n_heldout=30, seed=2)
        except AdvisorError as exc:
            message = str(exc)
    ok = (kill_resume.tree_hashes(out) == before and str(out / "scorecard.jsonl") in message
          and _cause(code) in message and not leftovers(out))
    return _result(f"dataset: {errno.errorcode[code]} at {op}", "disk", ok, message)


def export_fault(root: Path, code: int, op: str) -> dict:
    from collegeadvisor.export import export_merged

    run = straight_run(root)
    out = root / "export-fault"
    export_merged(run, out)
    before = kill_resume.tree_hashes(out)
    message = ""
    with disk_fault(op, code, "export-fault"):
        try:
            export_merged(run, out)
        except AdvisorError as exc:
            message = str(exc)
    ok = (kill_resume.tree_hashes(out) == before and "export-fault" in message and _cause(code) in message
          and not [p for p in root.iterdir() if p.name.startswith(".export-fault")])
    return _result(f"export: {errno.errorcode[code]} at {op}", "disk", ok, message)


def _limit_file_size(limit: int):
    def apply():  # in the child: files may not grow past `limit` bytes; writes past it fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def kb_os_fault(root: Path, rows: int = 600, batch: int = 100) -> dict:
    """`kb build` under a real file-size limit (RLIMIT_FSIZE: EFBIG from the OS, through Chroma's Rust and
    SQLite): one clear error naming the store, exit 1; the rows added before stay readable; the rerun without the
    limit ends with the same ids, documents and metadata as an uninterrupted build."""
    ref, out = root / "kbfault-ref", root / "kbfault"
    shutil.rmtree(out, ignore_errors=True)
    build = lambda path, n: kill_resume.cli("kb", "build", "--path", path, "--limit", n, "--batch-size", batch)  # noqa: E731
    if not ref.is_dir():
        kill_resume.run_ok(build(ref, rows), root / "kbfault-ref.log", root)
    kill_resume.run_ok(build(out, rows // 3), root / "kbfault.log", root)
    size = max(p.stat().st_size for p in out.rglob("*") if p.is_file())
    done = subprocess.run(build(out, rows), capture_output=True, text=True, env=kill_resume.child_env(), cwd=root,
                          preexec_fn=_limit_file_size(size + 20_000), timeout=600)
    message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    kept = int(subprocess.run([sys.executable, "-c", "import sys; from collegeadvisor.kb import open_store; "
                               "print(open_store(sys.argv[1]).count())", str(out)], capture_output=True, text=True,
                              env=kill_resume.child_env(), check=True).stdout.split()[-1])  # a fresh client
    kill_resume.run_ok(build(out, rows), root / "kbfault.log", root)
    a, b = kill_resume.store_snapshot(ref), kill_resume.store_snapshot(out)
    same = a["ids"] == b["ids"] and a["text_sha256"] == b["text_sha256"]
    ok = (done.returncode == 1 and message.startswith(f"error: kb build: cannot write to {out}")
          and "Traceback" not in done.stderr and kept >= rows // 3 and same)
    return _result("kb build: file-size limit (EFBIG, real OS)", "disk", ok, message, rows_kept=kept)


def training_os_fault(root: Path) -> dict:
    """A training run whose file-size limit drops (prlimit) after its 4th checkpoint: it stops with the checkpoint's
    path and EFBIG; the checkpoints before verify; --resume without the limit ends exactly like an uninterrupted run."""
    from collegeadvisor.train import checkpoint

    if not hasattr(resource, "prlimit"):
        return _result("training: file-size limit (EFBIG, real OS)", "disk", False, "resource.prlimit: Linux only")
    ref = kill_resume.train_reference(root, 30)
    run = root / "runs" / "os-fault"
    shutil.rmtree(run, ignore_errors=True)
    log = root / "os-fault.log"
    cmd = kill_resume.cli("train", *kill_resume.train_args(root, 30), "--run-name", run.name)
    with open(log, "wb") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=root, env=kill_resume.child_env(),
                             preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN))
        while p.poll() is None and len(kill_resume.losses(run)) < 4:
            time.sleep(kill_resume.POLL_S)
        resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (20_000, 20_000))  # from now on, as if the disk filled
        rc = p.wait()
    message = log.read_text(errors="replace").strip().splitlines()[-1]
    intact = [c.name for c in checkpoint.checkpoints(run)]
    for c in checkpoint.checkpoints(run):
        checkpoint.verify(c, run)
    kill_resume.run_ok(kill_resume.cli("train", "--resume", run), root / "os-fault-resume.log", root)
    same = kill_resume.compare_runs(ref, run, 30)["exact"]
    ok = rc == 1 and "(EFBIG)" in message and "cannot write" in message and intact and same
    return _result("training: file-size limit (EFBIG, real OS)", "disk", ok, message, resumed_exact=same)


DISK = [
    lambda r: training_fault(r, errno.ENOSPC, "write", "trainer_tensors"),
    lambda r: training_fault(r, errno.EIO, "fsync", "adapter_model"),
    lambda r: training_fault(r, errno.ENOSPC, "write", "/metrics.jsonl"),
    lambda r: manifest_fault(r, errno.ENOSPC, "write"),
    lambda r: manifest_fault(r, errno.EIO, "fsync"),
    lambda r: dataset_fault(r, errno.ENOSPC, "write"),
    lambda r: dataset_fault(r, errno.EIO, "fsync"),
    lambda r: export_fault(r, errno.EIO, "fsync"),
    kb_os_fault,
    training_os_fault,
]


# ------------------------------------------------------------------------------------------ hostile files
class RunsCode:
    """A pickle that, if ever unpickled, creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(RunsCode(marker))


def flip_bytes(path: Path, n: int = 4) -> None:
    """Invert the last n bytes of a file (a tampered or damaged tensor)."""
    with open(path, "r+b") as fh:
        fh.seek(-n, os.SEEK_END)
        tail = fh.read(n)
        fh.seek(-n, os.SEEK_END)
        fh.write(bytes(b ^ 0xFF for b in tail))


def copy_run(root: Path, name: str) -> Path:
    dst = root / "hostile" / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(straight_run(root), dst)
    return dst


def refused(name: str, action, expect: str, marker: Path | None = None) -> dict:
    """Run `action`; it must raise AdvisorError whose message contains `expect`, and no pickle may have run."""
    try:
        action()
        message, ok = "accepted", False
    except AdvisorError as exc:
        message, ok = str(exc), expect in str(exc)
    except Exception as exc:  # noqa: BLE001 - a traceback counts as a failure
        message, ok = f"{type(exc).__name__}: {exc}", False
    ran = marker is not None and marker.exists()
    return _result(name, "hostile", ok and not ran, message + (" (THE PICKLE RAN)" if ran else ""))


def _resume(run: Path):
    from collegeadvisor.config import load_config
    from collegeadvisor.train import train

    return lambda: train(load_config(None, {}), resume=run, log=lambda *_: None)


def hostile_checkpoints(root: Path) -> list[dict]:
    from collegeadvisor.train import checkpoint

    out = []
    marker = root / "hostile" / MARKER_NAME
    run = copy_run(root, "legacy-pickle")
    for c in checkpoint.checkpoints(run):
        (c / checkpoint.STATE).unlink()
        (c / checkpoint.LEGACY_STATE).write_bytes(evil_pickle(marker))
    out.append(refused("checkpoint: legacy trainer_state.pt pickle", _resume(run), "never loaded", marker))
    run = copy_run(root, "tampered-ckpt")
    for c in checkpoint.checkpoints(run):
        flip_bytes(c / checkpoint.TENSORS)
    out.append(refused("checkpoint: tampered tensors (sha256)", _resume(run), "sha256 differs"))
    run = copy_run(root, "ckpt-path-out")
    for c in checkpoint.checkpoints(run):
        state = json.loads((c / checkpoint.STATE).read_text())
        state["files"]["../../../../etc/passwd"] = "0" * 64
        (c / checkpoint.STATE).write_text(json.dumps(state))
    out.append(refused("checkpoint: state lists a path out of its folder", _resume(run), "leads out of its folder"))
    run = copy_run(root, "ckpt-symlink")
    elsewhere = root / "hostile" / "elsewhere-ckpt"
    shutil.rmtree(elsewhere, ignore_errors=True)
    elsewhere.mkdir(parents=True)
    for c in checkpoint.checkpoints(run):
        shutil.move(c, elsewhere / c.name)
        c.symlink_to(elsewhere / c.name, target_is_directory=True)
    out.append(refused("checkpoint: symlink out of the run", _resume(run), "symlink"))
    return out


def _load(run: Path):
    from collegeadvisor.runs import load_run

    return lambda: load_run(run)


def hostile_runs(root: Path) -> list[dict]:
    out = []
    marker = root / "hostile" / MARKER_NAME
    run = copy_run(root, "adapter-bin")
    (run / "adapter" / "adapter_model.bin").write_bytes(evil_pickle(marker))
    out.append(refused("adapter: pickle adapter_model.bin beside the safetensors", _load(run), "pickle", marker))
    run = copy_run(root, "adapter-tampered")
    flip_bytes(run / "adapter" / "adapter_model.safetensors")
    out.append(refused("adapter: tampered weights (sha256)", _load(run), "sha256 differs"))
    run = copy_run(root, "adapter-symlink")
    outside = root / "hostile" / "outside-adapter"
    shutil.rmtree(outside, ignore_errors=True)
    shutil.move(run / "adapter", outside)
    (run / "adapter").symlink_to(outside, target_is_directory=True)
    out.append(refused("adapter: symlink out of the run", _load(run), "symlink"))
    run = copy_run(root, "adapter-file-symlink")
    (run / "adapter" / "adapter_config.json").unlink()
    (run / "adapter" / "adapter_config.json").symlink_to("/etc/hostname")
    out.append(refused("adapter: a file symlinked out", _load(run), "symlink"))
    run = copy_run(root, "manifest-template")
    m = json.loads((run / "manifest.json").read_text())
    m["format"]["chat_template"] += "{{ 'injected' }}"
    (run / "manifest.json").write_text(json.dumps(m))
    out.append(refused("manifest: chat template edited (sha256)", _load(run), "does not match its recorded sha256"))
    run = copy_run(root, "manifest-hash")
    m = json.loads((run / "manifest.json").read_text())
    m["adapter"]["files"]["adapter_model.safetensors"] = "0" * 64
    (run / "manifest.json").write_text(json.dumps(m))
    out.append(refused("manifest: adapter hash changed", _load(run), "sha256 differs"))
    run = copy_run(root, "manifest-garbage")
    (run / "manifest.json").write_text("[1, 2, 3]")
    out.append(refused("manifest: not an object", _load(run), "corrupt manifest"))
    return out


def hostile_exports_data_kb(root: Path) -> list[dict]:
    from collegeadvisor.data.loaders import load_examples
    from collegeadvisor.export import export_merged, verify_export

    out = []
    marker = root / "hostile" / MARKER_NAME
    run = straight_run(root)
    exp = root / "hostile" / "export-bin"
    shutil.rmtree(exp, ignore_errors=True)
    export_merged(run, exp)
    (exp / "model.safetensors").unlink()
    (exp / "pytorch_model.bin").write_bytes(evil_pickle(marker))
    out.append(refused("export: pickle pytorch_model.bin", lambda: verify_export(run, "merged", exp, n=1), "pickle",
                       marker))
    gg = root / "hostile" / "export-gguf-path"
    gg.mkdir(parents=True, exist_ok=True)
    (gg / "collegeadvisor-export.json").write_text(json.dumps({"file": "../../../../etc/passwd", "gguf_type": "f32"}))
    out.append(refused("export: provenance names a file outside the export",
                       lambda: verify_export(run, "gguf", gg, n=1), "not a plain file name"))
    data = root / "hostile" / "data.pkl"
    data.write_bytes(evil_pickle(marker))
    out.append(refused("dataset: a pickle file", lambda: load_examples(data), "unknown file type", marker))
    disguised = root / "hostile" / "data.json"
    disguised.write_bytes(evil_pickle(marker))
    out.append(refused("dataset: a pickle named .json", lambda: load_examples(disguised), str(disguised), marker))
    out.append(kb_pickle(root, marker))
    return out


def kb_pickle(root: Path, marker: Path) -> dict:
    """Chroma keeps each index's metadata in `index_metadata.pickle`, read by its Rust core as data only (a pickle
    that would run code cannot): a tampered one must make the store fail to load, in a fresh process, without
    running."""
    kb = root / "hostile" / "kb-pickle"
    shutil.rmtree(kb, ignore_errors=True)
    kill_resume.run_ok(kill_resume.cli("kb", "build", "--path", kb, "--limit", 1100, "--batch-size", 1100),
                       root / "hostile" / "kb-pickle.log", root)
    planted = list(kb.rglob("index_metadata.pickle"))
    for p in planted:
        p.write_bytes(evil_pickle(marker))
    done = subprocess.run([sys.executable, "-c", "import sys; from collegeadvisor.kb import open_store, embed; "
                           "print(open_store(sys.argv[1]).query(query_embeddings=embed(['nursing']), n_results=3))",
                           str(kb)], capture_output=True, text=True, env=kill_resume.child_env())
    message = (done.stderr.strip().splitlines() or [""])[-1]
    ok = bool(planted) and done.returncode != 0 and "pickle" in message and not marker.exists()
    return _result("knowledge base: a code-running index_metadata.pickle is read as data, not run", "hostile", ok,
                   message)


HOSTILE = [hostile_checkpoints, hostile_runs, hostile_exports_data_kb]


def run_all(root: Path, disk: bool = True, hostile: bool = True, log=print) -> list[dict]:
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for scenario in DISK if disk else []:
        results.append(scenario(root))
        log(f"  {results[-1]}")
    for group in HOSTILE if hostile else []:
        for r in group(root):
            results.append(r)
            log(f"  {r}")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    args = ap.parse_args(argv)
    results = run_all(Path(args.work or tempfile.mkdtemp(prefix="collegeadvisor-faults-")))
    print(json.dumps(results, indent=2))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
