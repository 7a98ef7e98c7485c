"""Shared by the benchmarks: write one `## Section` of BENCHMARKS.md, leaving the others as they are."""

from __future__ import annotations

import re
from pathlib import Path

from collegeadvisor.fsutil import atomic_write_text

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nMeasured on this project's machine kind (2 vCPU, 24 GiB) unless a section says otherwise.\n"


def write_section(title: str, body: str, path: Path = BENCHMARKS) -> None:
    text = path.read_text() if path.is_file() else HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    atomic_write_text(path, text)


def cpu_name() -> str:
    """The CPU, as BENCHMARKS.md names it beside every figure ("... with AMX" where it has AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "a CPU")
    return name + (" with AMX" if "amx_int8" in info else "")
