"""A finding: an error (training refuses to start unless --force), a warning or an info line, naming the example's
`file:line` or the setting, plus what to do; and how findings are grouped, ordered and printed."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Sequence

LEVELS = ("error", "warning", "info")
CHECKS = ("format", "masking", "length", "setup", "runs", "retrieval", "environment")
LISTED = 5  # example lines named per finding
STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


@dataclass
class Finding:
    level: str  # error | warning | info
    check: str  # format | masking | length | setup | runs | retrieval | environment
    where: str  # file:line or a setting name
    message: str
    fix: str = ""
    code: str = ""  # a stable name for the kind of finding (tests and grouping)
    data: dict = field(default_factory=dict)  # numbers behind an info line (histogram, estimates)

    def __str__(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.level}: [{self.check}] {self.where}: {self.message}{fix}"


def finding(level, check, where, message, fix="", code="", **data) -> Finding:
    return Finding(level, check, str(where), message, fix, code, data)


def errors(findings: Sequence[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def lines_of(wheres: Sequence[str]) -> str:
    """'3, 7, 9, ...': the line numbers of the first few file:line places."""
    return ", ".join(w.rsplit(":", 1)[-1] for w in wheres[:LISTED]) + (", ..." if len(wheres) > LISTED else "")


def group(findings: Sequence[Finding]) -> list[Finding]:
    """One finding per (code, level): the first example's file:line, the count and the first few lines."""
    out: list[Finding] = []
    groups: dict[tuple, list[Finding]] = {}
    for f in findings:
        if not f.code:
            out.append(f)
            continue
        key = (f.code, f.level, f.check)
        if key not in groups:
            groups[key] = []
            out.append(f)
        groups[key].append(f)
    merged = []
    for f in out:
        same = groups.get((f.code, f.level, f.check)) if f.code else None
        if same and len(same) > 1:
            wheres = [g.where for g in same]
            f = Finding(f.level, f.check, f.where, f"{f.message} ({plural(len(same), 'example')}; lines "
                        f"{lines_of(wheres)})", f.fix, f.code, {**f.data, "count": len(same), "wheres": wheres})
        merged.append(f)
    return merged


def ordered(findings: Sequence[Finding]) -> list[Finding]:
    """Errors first, then warnings, then info; within a level, in the order of CHECKS."""
    return sorted(findings, key=lambda f: (LEVELS.index(f.level), CHECKS.index(f.check)))


def print_findings(findings: Sequence[Finding], file=None) -> None:
    """Errors first, then warnings, then info (histograms drawn as bars); a count line at the end."""
    # rich (~12 ms): kept off the CLI's start, loaded when findings print
    from rich.console import Console
    from rich.text import Text

    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)
    for f in ordered(list(findings)):
        line = Text()
        line.append(f"{f.level.upper():<8}", style=STYLE[f.level])
        line.append(f"{f.check:<12}", style="bold")
        line.append(f"{f.where}: ", style="dim" if f.level == "info" else "")
        line.append(f.message)
        console.print(line)
        if f.fix:
            console.print(Text("                    fix: ", style="green") + Text(f.fix))
        if f.data.get("histogram"):
            bins = f.data["histogram"]
            top = max(c for _, c in bins) or 1
            for label, count in bins:
                bar = "#" * math.ceil(30 * count / top) if count else ""
                style = "red" if label.startswith(">") and count else "cyan"
                console.print(Text(f"{'':20}{label:>11} {count:>6} ") + Text(bar, style=style))
    n_err = len(errors(findings))
    n_warn = sum(1 for f in findings if f.level == "warning")
    summary_line = f"preflight: {plural(n_err, 'error')}, {plural(n_warn, 'warning')}"
    console.print(Text(summary_line, style="bold red" if n_err else ("yellow" if n_warn else "green")))


def summary(findings: Sequence[Finding], force_hint: bool = True) -> str:
    errs = errors(findings)
    first = f" (first: {errs[0].where}: {errs[0].message})" if errs else ""
    hint = "; fix them or pass --force" if force_hint else "; fix them"
    return f"{plural(len(errs), 'error')} in preflight{first}{hint}"
