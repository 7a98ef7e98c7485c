"""Files handed over by someone else (a run folder, a checkpoint, an export) are checked before anything reads
them: no symlink, nothing that leads out of its folder, no pickle, and the sha256 recorded when it was written.

Nothing in collegeadvisor unpickles a file: tensors are safetensors, state is JSON. A folder that holds pickle
files where safetensors are expected is refused rather than handed to a loader that might unpickle it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from collegeadvisor.chat_format import template_hash
from collegeadvisor.errors import ManifestError
from collegeadvisor.fsutil import file_sha256

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}


def check_inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """`path` itself, when neither it nor any folder between root and it is a symlink and it resolves inside root;
    else ManifestError naming it."""
    path, root = Path(path), Path(root)
    real_root = root.resolve()
    try:
        rel = path.absolute().relative_to(root.absolute())
    except ValueError:
        raise ManifestError(f"{path}: outside the run folder {root}; refusing it") from None
    at = root
    for part in rel.parts:
        at = at / part
        if at.is_symlink():
            raise ManifestError(f"{at}: a symlink (to {os.readlink(at)}); files of a run are never read through "
                                "links, refusing it")
    if not (path.resolve() == real_root or real_root in path.resolve().parents):
        raise ManifestError(f"{path}: resolves outside the run folder {root}; refusing it")
    return path


def file_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """{relative posix path: sha256} of every file under folder (symlinks are refused, not followed)."""
    folder = Path(folder)
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            if p.is_symlink():
                raise ManifestError(f"{p}: a symlink inside {folder}; refusing it")
        for name in sorted(files):
            p = Path(dirpath) / name
            out[p.relative_to(folder).as_posix()] = file_sha256(p)
    return dict(sorted(out.items()))


def _safe_relative(rel: str, where: Path) -> PurePosixPath:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts or "\\" in rel:
        raise ManifestError(f"{where}: lists the path {rel!r}, which leads out of its folder; refusing it")
    return p


def verify_hashes(folder: str | os.PathLike, hashes: dict[str, str], root: str | os.PathLike,
                  what: str = "checkpoint") -> None:
    """Every listed file exists inside root as a plain file with its recorded sha256; no symlink anywhere in the
    folder. ManifestError names the first file that fails."""
    folder = Path(folder)
    check_inside(folder, root)
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            if (Path(dirpath) / name).is_symlink():
                raise ManifestError(f"{Path(dirpath) / name}: a symlink inside the {what}; refusing it")
    for rel, digest in hashes.items():
        p = folder / _safe_relative(rel, folder)
        check_inside(p, root)
        if not p.is_file():
            raise ManifestError(f"{p}: missing from the {what} (it was listed when it was written)")
        if file_sha256(p) != digest:
            raise ManifestError(f"{p}: sha256 differs from the one recorded when the {what} was written "
                                "(the file was changed or damaged); refusing it")


def refuse_pickles(folder: str | os.PathLike, what: str, suffixes: set[str] = PICKLE_SUFFIXES) -> None:
    """A folder we load from must not offer pickle files (a loader could pick them)."""
    folder = Path(folder)
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if Path(name).suffix.lower() in suffixes:
                raise ManifestError(f"{Path(dirpath) / name}: a pickle-format file in the {what}; collegeadvisor "
                                    "never loads pickles (they can run code); remove it")


def export_member(folder: str | os.PathLike, name) -> Path:
    """A file an export's provenance names: a plain name inside the export folder, not a link out of it."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or PurePosixPath(name).name != name or "\\" in name or name in (".", ".."):
        raise ManifestError(f"{folder / 'collegeadvisor-export.json'}: names the file {name!r}, which is not a plain "
                            "file name inside the export; refusing it")
    path = check_inside(folder / name, folder)
    if not path.is_file():
        raise ManifestError(f"{path}: missing from the export")
    return path


def verify_adapter(run_dir: str | os.PathLike, manifest: dict) -> Path:
    """The run's adapter/ folder, checked before peft reads it: inside the run folder, no symlinks, no pickles,
    adapter_model.safetensors present, and every file's sha256 equal to the manifest's (runs written before
    hashes were recorded are checked for the rest)."""
    run_dir = Path(run_dir)
    adir = run_dir / "adapter"
    check_inside(adir, run_dir)
    if not adir.is_dir():
        raise ManifestError(f"{run_dir}: no adapter/ (the run did not finish)")
    refuse_pickles(adir, "adapter")
    if not (adir / "adapter_model.safetensors").is_file():
        raise ManifestError(f"{adir}: no adapter_model.safetensors (the only adapter format collegeadvisor loads)")
    recorded = (manifest.get("adapter") or {}).get("files")
    if recorded is not None:
        if not isinstance(recorded, dict):
            raise ManifestError(f"{run_dir / 'manifest.json'}: 'adapter.files' is not a mapping of file hashes")
        for need in ("adapter_model.safetensors", "adapter_config.json"):
            if need not in recorded:
                raise ManifestError(f"{run_dir / 'manifest.json'}: records no hash for adapter/{need}; refusing it")
        verify_hashes(adir, recorded, run_dir, what="adapter")
    else:
        verify_hashes(adir, {}, run_dir, what="adapter")  # still: no symlinks
    return adir


def verify_manifest(run_dir: str | os.PathLike, manifest: dict) -> None:
    """Consistency of what a manifest says about itself: its chat template matches its recorded hash."""
    base = manifest.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("spec"), str):
        raise ManifestError(f"{Path(run_dir) / 'manifest.json'}: no base model recorded (base_model.spec)")
    fmt = manifest.get("format")
    if not isinstance(fmt, dict) or not isinstance(fmt.get("chat_template"), str):
        raise ManifestError(f"{Path(run_dir) / 'manifest.json'}: no chat template recorded")
    if template_hash(fmt["chat_template"]) != fmt.get("template_sha256"):
        raise ManifestError(f"{Path(run_dir) / 'manifest.json'}: the chat template does not match its recorded "
                            "sha256 (the manifest was edited); refusing it")
