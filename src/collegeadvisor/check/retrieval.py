"""Retrieval checks: chromadb imported for real (in a subprocess, so a crash or a refused sqlite3 cannot take the
preflight down), and the knowledge base a run trained on retrieved rows (or --kb-path / --kb-url) reads from:
there, full, built with the run's embedding model and row format."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import collegeadvisor
from collegeadvisor.check.findings import Finding, errors, finding
from collegeadvisor.data.scorecard import load_table, row_format_id
from collegeadvisor.errors import AdvisorError, ManifestError
from collegeadvisor.kb.store import DEFAULT_PATH, kb_info
from collegeadvisor.models import EMBEDDING_MODEL
from collegeadvisor.runs import read_manifest

CHROMADB_PROBE_S = 90.0  # importing chromadb in a subprocess takes 2-10 s; longer than this counts as a hang
CHROMADB_REINSTALL = "pip install --force-reinstall chromadb"


def run_retrieval(run: str | Path | None) -> dict | None:
    """The run manifest's "retrieval" section ({"k", "embedder", "row_format"}), written when the run was trained on
    retrieval-grounded data; None without one (an unreadable manifest is check_run's finding)."""
    if run is None:
        return None
    try:
        section = read_manifest(run).get("retrieval")
    except ManifestError:
        return None
    return section if isinstance(section, dict) else None


def _kb_build(kb_path, kb_url) -> str:
    return f"collegeadvisor kb build --url {kb_url}" if kb_url else f"collegeadvisor kb build --path {kb_path}"


def check_kb(kb_path: str | Path | None = None, kb_url: str | None = None, retrieval: dict | None = None,
             table_rows: int | None = None) -> list[Finding]:
    """The knowledge base at kb_path (default kb_store) or kb_url: there, holding every row of the table
    (`table_rows`, default the Scorecard table's), built with the embedding model and row format the run was
    trained on (`retrieval`, the manifest's section), else the ones this version uses."""
    kb_path = None if kb_url else str(kb_path or DEFAULT_PATH)
    where, build = kb_url or kb_path, _kb_build(kb_path, kb_url)
    why = " (the run was trained on retrieved rows)" if retrieval else ""
    try:
        info = kb_info(kb_path, kb_url)
    except AdvisorError as exc:
        return [finding("error", "retrieval", where, f"cannot open the knowledge base: {exc}",
                        "start the Chroma server, or pass --kb-path FOLDER", "kb-unreachable")]
    if not info["exists"]:
        return [finding("error", "retrieval", where, f"no knowledge base here{why}", f"build it: {build}",
                        "kb-missing")]
    if info["rows"] == 0:
        return [finding("error", "retrieval", where, f"the knowledge base holds no Scorecard rows{why}",
                        f"build it: {build}", "kb-empty")]
    out = []
    if table_rows is None:
        table_rows = int(load_table()["row_id"].nunique())
    if info["rows"] < table_rows:
        out.append(finding("error", "retrieval", where, f"the knowledge base holds {info['rows']:,} of the table's "
                           f"{table_rows:,} rows (an interrupted or --limit build): questions about the others "
                           "retrieve the wrong rows", f"resume the build (it adds only what is missing): {build}",
                           "kb-rows", rows=info["rows"], table_rows=table_rows))
    out += _kb_versions(info, retrieval, where, build)
    if not out:
        out.append(finding("info", "retrieval", where, f"knowledge base: {info['rows']:,} rows"
                           + (f" and {info['passages']:,} passages" if info["passages"] else "")
                           + f", embedder {info['embedder']}, row format {info['row_format']}"
                           + (" (as the run was trained)" if retrieval else ""), code="kb"))
    return out


def _kb_versions(info: dict, retrieval: dict | None, where: str, build: str) -> list[Finding]:
    """The knowledge base's embedder and row format against the run's (or this version's); the run's against this
    version's."""
    out = []
    current = {"embedder": EMBEDDING_MODEL, "row_format": row_format_id()}
    what = {"embedder": "embedding model", "row_format": "row format (data.scorecard.row_format_id)"}
    rebuild = (f"build a new one and point at it: collegeadvisor kb build --path NEW_FOLDER, then --kb-path "
               f"NEW_FOLDER (or delete {where} and run {build})")
    for key in ("embedder", "row_format"):
        want, whose = ((retrieval[key], "the run was trained with") if retrieval and retrieval.get(key)
                       else (current[key], "this version uses"))
        if want != current[key]:  # rebuilding cannot help: this version writes another
            out.append(finding("error", "retrieval", key, f"the run was trained with {what[key]} {want!r}; this "
                               f"version uses {current[key]!r}, so no knowledge base built now matches it",
                               "retrain on data this version builds, or use the collegeadvisor version the run was "
                               "trained with", f"run-{key.replace('_', '-')}"))
        elif info[key] is None:
            out.append(finding("warning", "retrieval", where, f"the knowledge base does not record its {what[key]} "
                               "(built before builds recorded it)", rebuild, "kb-unrecorded"))
        elif info[key] != want:
            out.append(finding("error", "retrieval", where, f"the knowledge base was built with {what[key]} "
                               f"{info[key]!r}; {whose} {want!r}", rebuild, f"kb-{key.replace('_', '-')}"))
    return out


def _probe(pythonpath: str | None) -> tuple[int | None, dict[str, str], str]:
    """(exit status, None on a hang; the probe's "key value" lines; the last line of its stderr) of
    kb.store.probe_chromadb run in a fresh interpreter, with `pythonpath` first on its path."""
    key = (pythonpath, sys.executable, os.environ.get("PYTHONPATH"))
    if key in _PROBED:
        return _PROBED[key]
    src = str(Path(collegeadvisor.__file__).resolve().parents[1])  # this collegeadvisor, however it was found
    paths = [p for p in (pythonpath, src, os.environ.get("PYTHONPATH")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "ANONYMIZED_TELEMETRY": "False"}
    code = "from collegeadvisor.kb.store import probe_chromadb; probe_chromadb()"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=CHROMADB_PROBE_S, check=False)
    except subprocess.TimeoutExpired:
        result: tuple = (None, {}, "")
    else:
        lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
        stderr = [line for line in done.stderr.splitlines() if line.strip()]
        result = (done.returncode, lines, stderr[-1].strip() if stderr else "")
    _PROBED[key] = result
    return result


_PROBED: dict[tuple, tuple] = {}  # the probe's result per (pythonpath, interpreter, PYTHONPATH): once per process


def check_chromadb(pythonpath: str | None = None) -> list[Finding]:
    """chromadb imported and a client opened for real, in a subprocess (a crash or a refused sqlite3 cannot take the
    preflight down): not installed, installed but failing on import, refusing this Python's sqlite3, or fine."""
    status, out, stderr = _probe(pythonpath)
    if status is None:
        return [finding("error", "environment", "chromadb", "importing chromadb did not finish in "
                        f"{CHROMADB_PROBE_S:.0f} s", CHROMADB_REINSTALL, "chromadb-broken")]
    origin = out.get("chromadb-at")
    if origin is None:
        return [finding("warning", "environment", "chromadb", "could not probe chromadb: "
                        f"{stderr or f'exit status {status}'}", "run: python -c 'import chromadb'", "chromadb-probe")]
    if origin == "None":
        return [finding("error", "environment", "chromadb", "the package 'chromadb' that kb needs is not installed",
                        "pip install 'chromadb'", "missing-package", stage="kb")]
    error = re.sub(r"\x1b\[[0-9;]*m", "", out.get("chromadb-error", ""))[:300]
    if "unsupported version of sqlite3" in error:
        return [finding("error", "environment", "chromadb", f"chromadb ({origin}) refuses this Python's sqlite3 "
                        f"{out.get('sqlite', '?')}: Chroma needs sqlite3 3.35 or newer",
                        "pip install pysqlite3-binary (collegeadvisor then imports it in sqlite3's place, Chroma's "
                        "documented swap), or use a Python whose sqlite3 is 3.35 or newer", "chromadb-sqlite")]
    if error or status != 0 or "chromadb-ok" not in out:
        why = error or (f"the import crashed (signal {-status})" if status < 0 else stderr or f"exit status {status}")
        return [finding("error", "environment", "chromadb", f"chromadb is installed ({origin}) but fails on "
                        f"import: {why}", CHROMADB_REINSTALL, "chromadb-broken")]
    return [finding("info", "environment", "chromadb", f"chromadb {out['chromadb-ok']} imports and opens a client "
                    f"(sqlite3 {out.get('sqlite', '?')})", code="chromadb")]


def check_retrieval(run: str | Path | None, kb_path=None, kb_url=None, probed: Sequence[Finding] = ()) -> list[Finding]:
    """When the run was trained on retrieved rows, or a knowledge base is named: chromadb (unless `probed` holds
    its findings already), then the knowledge base (check_kb)."""
    retrieval = run_retrieval(run)
    if retrieval is None and kb_path is None and kb_url is None:
        return []
    chroma = [f for f in probed if f.where == "chromadb"]
    out = [] if chroma else check_chromadb()
    if errors(chroma or out):
        return out
    return out + check_kb(kb_path, kb_url, retrieval)

