"""Atomic writes: a reader never sees a half-written manifest, dataset, knowledge base file or checkpoint.

Every file is written to a temporary name beside its target, fsynced, then renamed over it (and the folder is
fsynced), so a kill or a power cut leaves either the old file or the new one. Folders (checkpoints, adapters,
exports) are written to a staging folder whose files are all fsynced before the one rename that publishes it.
A failed write (ENOSPC, EIO, ...) removes its temporary file and raises WriteError naming the path and the cause;
the previous version stays intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from collegeadvisor.errors import AdvisorError


class WriteError(AdvisorError):
    """A write that failed on disk (full, I/O error, read-only...): names the path and the cause."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, cause: str = ""):
        super().__init__(message)
        self.path, self.cause = path, cause


def describe(exc: BaseException) -> str:
    """'No space left on device (ENOSPC)' for an OSError, or for another writer's error that carries an OS error
    number (Rust's "I/O error: ... (os error 28)")."""
    if not isinstance(exc, OSError):
        found = re.search(r"os error (\d+)", str(exc))
        return describe(OSError(int(found[1]), os.strerror(int(found[1])))) if found else str(exc)
    code = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__)
    return f"{text} ({code})" if code else text


def write_error(path: str | os.PathLike, exc: OSError, kept: str = "the previous version is intact") -> WriteError:
    return WriteError(f"cannot write {path}: {describe(exc)}; {kept}", path, describe(exc))


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort: some file systems refuse fsync on a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(path.parent, path.name)  # what a killed writer of this file left
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        try:
            os.fchmod(fd, path.stat().st_mode & 0o777 if path.is_file() else 0o644)  # mkstemp's 0600 otherwise
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append whole lines to a log (metrics, samples); a failed write names the file and the cause. A line cut by
    a kill is dropped when the log is read back (train.checkpoint.trim_log)."""
    path = Path(path)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise write_error(path, exc, "the lines written before are intact") from exc


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under root, then every folder: what a rename publishes afterwards is on disk."""
    root = Path(root)
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise write_error(path, exc) from exc
    for folder, _, _ in os.walk(root, topdown=False):
        _fsync_dir(Path(folder))


def _old_of(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_dir(final: str | os.PathLike) -> None:
    """Finish an atomic_replace_dir that a kill cut between its two renames: the old folder comes back (or, if the
    new one is in place, the leftover old copy goes)."""
    final = Path(final)
    for old in (_old_of(final), final.with_name(final.name + ".old")):  # the second: names before this version
        if not old.exists():
            continue
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


def atomic_replace_dir(staging: Path, final: Path) -> None:
    """Publish a fully written staging folder: every file is fsynced, then it is renamed into place; an existing
    folder is moved aside first and removed only after (a kill in between is undone by recover_dir)."""
    final = Path(final)
    recover_dir(final)
    fsync_tree(staging)
    old = _old_of(final)
    try:
        if final.exists():
            os.replace(final, old)
        os.replace(staging, final)
    except OSError as exc:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise write_error(final, exc) from exc
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


STAGED = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def clean_stale_staging(folder: str | os.PathLike, final_name: str | None = None) -> list[Path]:
    """Remove the staging folders (and trash) in `folder` that killed processes left behind: their names carry
    the writer's pid, and a live writer's are kept. final_name: only those for that target."""
    folder = Path(folder)
    removed = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = STAGED.match(p.name)
        if not m or (final_name is not None and m["final"] != final_name):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def staging_dir(final: Path) -> Path:
    """A fresh staging folder beside `final` (named with this process's id, so a later run can tell a killed
    writer's leftovers from a live one's and remove them)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(final.parent, final.name)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise write_error(final, exc) from exc


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
