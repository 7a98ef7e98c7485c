"""The evaluation report: `report.json` (everything) and a self-contained `report.html` (inline CSS, plots as
base64 PNG) comparing any number of systems."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from collegeadvisor.data.heldout import json_lines
from collegeadvisor.eval.metrics import METRICS
from collegeadvisor.fsutil import atomic_write_json, atomic_write_text

# Sample-answer failures: score key, the value that fails, badge text.
FAILURES = [
    ("empty", True, "empty reply"),
    ("numeric_correct", False, "wrong figure"),
    ("yes_no_correct", False, "wrong yes/no"),
    ("no_data_correct", False, "missed no-data"),
    ("stopped_at_eos", False, "not stopped at EOS"),
]
# Per-kind breakdown rows: key in aggregate()["by_kind"][kind] -> label.
KIND_METRICS = {
    "numeric_accuracy": "figure accuracy",
    "yes_no_accuracy": "yes/no accuracy",
    "no_data_recall": "no-data recall",
    "rouge_l": "ROUGE-L F1",
    "empty_rate": "empty replies",
}
REPLY_CHARS = 1500  # longer replies are cut in the HTML (report.json keeps them whole)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;
padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.3rem .5rem;vertical-align:top;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:bold;background:#eaf6ea}
table.samples td{white-space:pre-wrap;word-break:break-word;max-width:28rem}
td.fail{background:#fdeaea}span.badge{display:inline-block;background:#c0392b;color:#fff;border-radius:3px;
padding:0 .3rem;margin:0 .2rem .2rem 0;font-size:.75rem;white-space:nowrap}
.note{color:#666;font-style:italic}img{max-width:100%}
"""


CURVES = ("loss", "val_loss", "tokens_per_s", "rss_mb")  # what the report reads of a run's metrics.jsonl


def read_training_curve(metrics_jsonl: Path | None) -> dict[str, Any]:
    """Training loss, validation loss, tokens/s and resident memory as [step, value] pairs from a training metrics
    JSONL, with a note
    saying why there is no curve (no file, unreadable, no loss) or how many lines were skipped."""
    curve: dict[str, Any] = {"loss": [], "val_loss": [], "tokens_per_s": [], "rss_mb": [], "note": None}
    if metrics_jsonl is None:
        curve["note"] = "no training metrics file was given"
        return curve
    try:
        lines = Path(metrics_jsonl).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        curve["note"] = f"training metrics not readable: {metrics_jsonl} ({e.strerror or e})"
        return curve
    skipped = 0
    for n, rec in json_lines(lines):
        if not isinstance(rec, dict):  # malformed (json_lines gives its error) or not an object
            skipped += 1
            continue
        step = rec.get("step", n - 1)
        for key in CURVES:
            value = rec.get(key)
            if _finite(value) and _finite(step):
                curve[key].append([step, float(value)])
    if not curve["loss"] and not curve["val_loss"]:
        curve["note"] = f"no loss values in {metrics_jsonl}"
    elif skipped:
        curve["note"] = f"{skipped} unreadable line(s) in {metrics_jsonl} were skipped"
    return curve


def write_report(
    out_dir: Path,
    results: dict[str, dict],
    samples: dict[str, list[dict]],
    metrics_jsonl: Path | None = None,
    meta: dict | None = None,
) -> tuple[Path, Path]:
    """Write report.json and report.html under out_dir (atomically); return their paths.

    results: system name -> aggregate() dict; samples: system name -> rows of question, reference, reply, scores.
    """
    out_dir = Path(out_dir)
    data = _clean({
        "meta": meta or {},
        "metrics": METRICS,
        "results": {name: dict.fromkeys(METRICS) | dict(res or {}) for name, res in results.items()},
        "samples": samples,
        "training_curve": read_training_curve(metrics_jsonl),
    })
    json_path = atomic_write_json(out_dir / "report.json", data)
    html_path = atomic_write_text(out_dir / "report.html", _html(data))
    return json_path, html_path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/Inf as None, numpy scalars as Python, strings valid UTF-8 (lone surrogates escaped)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _loss_chart(curve: dict) -> str | None:
    from matplotlib.figure import Figure  # heavy: only when a chart is drawn; no pyplot, Agg renders the PNG

    if not curve["loss"] and not curve["val_loss"]:
        return None
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    for key, style in (("loss", {"lw": 1.2}), ("val_loss", {"marker": "o", "lw": 1.5})):
        if curve[key]:
            steps, values = zip(*curve[key])
            ax.plot(steps, values, label={"loss": "training loss", "val_loss": "validation loss"}[key], **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _pace_chart(curve: dict) -> str | None:
    """Tokens/s and resident memory over the run's steps, side by side: a run that slows or grows shows here."""
    from matplotlib.figure import Figure

    panels = [(key, label) for key, label in (("tokens_per_s", "tokens/s"), ("rss_mb", "resident memory (MiB)"))
              if curve.get(key)]
    if not panels:
        return None
    fig = Figure(figsize=(8, 3))
    for ax, (key, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        steps, values = zip(*curve[key])
        ax.plot(steps, values, lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _results_chart(results: dict[str, dict]) -> str | None:
    """Rates grouped by metric on one shared 0-100% axis; other metrics (perplexity, latency...) one panel each.
    Every bar is labelled with its value; a system without a value gets "n/a" and no bar."""
    from matplotlib.figure import Figure  # matplotlib (heavy): only when a chart is drawn

    systems = list(results)
    present = [m for m in METRICS if any(_finite(results[s].get(m)) for s in systems)]
    rates = [m for m in present if METRICS[m]["percent"]]
    others = [m for m in present if not METRICS[m]["percent"]]
    if not present:
        return None
    cols = max(len(others), 1)
    heights = ([4] if rates else []) + ([3] if others else [])
    fig = Figure(figsize=(max(10, 2.6 * cols), sum(heights) + 0.5), layout="constrained")
    grid = fig.add_gridspec(len(heights), cols, height_ratios=heights)
    colors = [f"C{i % 10}" for i in range(len(systems))]

    def bars(ax, xs, s_m: list[tuple[str, str]], scale: float, percent: bool, **kw) -> None:
        values = [results[s].get(m) for s, m in s_m]
        container = ax.bar(xs, [scale * v if _finite(v) else 0.0 for v in values], **kw)
        ax.bar_label(container, labels=[_fmt(v, percent) if _finite(v) else "n/a" for v in values], fontsize=7)
        ax.grid(axis="y", alpha=0.3)

    if rates:
        ax = fig.add_subplot(grid[0, :])
        width = 0.8 / len(systems)
        for i, s in enumerate(systems):
            xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(rates))]
            bars(ax, xs, [(s, m) for m in rates], 100.0, True, width=width, label=s, color=colors[i])
        ax.set_xticks(range(len(rates)), [textwrap.fill(_arrow_label(m), 16) for m in rates], fontsize=8)
        ax.set_ylim(0, 112)
        ax.set_ylabel("%")
        ax.legend(fontsize=8, ncol=min(len(systems), 6), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    for j, m in enumerate(others):
        ax = fig.add_subplot(grid[len(heights) - 1, j])
        bars(ax, range(len(systems)), [(s, m) for s in systems], 1.0, False, color=colors)
        ax.set_xticks(range(len(systems)), systems, fontsize=8, rotation=20)
        ax.set_title(_arrow_label(m), fontsize=9)
        ax.margins(y=0.15)
    return _png(fig)


def _arrow_label(m: str) -> str:
    return f"{METRICS[m]['label']} {'↑' if METRICS[m]['higher_is_better'] else '↓'}"


def _fmt(v: Any, percent: bool) -> str:
    if not _finite(v):
        return "—"
    return f"{100 * v:.1f}%" if percent else f"{v:.3g}"


def _best(values: list[Any], higher: bool | None) -> float | None:
    vals = [v for v in values if _finite(v)]
    if higher is None or len(vals) < 2 or min(vals) == max(vals):
        return None
    return max(vals) if higher else min(vals)


def _metric_row(label: str, values: list[Any], percent: bool, higher: bool | None) -> str:
    best = _best(values, higher)
    cells = "".join(
        f'<td class="num{" best" if best is not None and v == best else ""}">{_fmt(v, percent)}</td>' for v in values
    )
    return f"<tr><th>{html.escape(label)}</th>{cells}</tr>"


def _metrics_table(results: dict[str, dict]) -> str:
    systems = list(results)
    head = "".join(f"<th>{html.escape(s)}</th>" for s in systems)
    rows = [
        _metric_row(_arrow_label(m), [results[s].get(m) for s in systems], spec["percent"], spec["higher_is_better"])
        for m, spec in METRICS.items()
    ]
    rows.append(_metric_row("questions", [results[s].get("n") for s in systems], False, None))
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _kinds_table(results: dict[str, dict]) -> str:
    systems = list(results)
    by_kind = {s: results[s].get("by_kind") or {} for s in systems}
    kinds = sorted({k for s in systems for k in by_kind[s]})
    if not kinds:
        return '<p class="note">No per-kind breakdown.</p>'
    head = "".join(f"<th>{html.escape(s)}</th>" for s in systems)
    rows = []
    for kind in kinds:
        n = max((by_kind[s].get(kind, {}).get("n") or 0 for s in systems), default=0)
        for m, label in KIND_METRICS.items():
            values = [by_kind[s].get(kind, {}).get(m) for s in systems]
            if any(_finite(v) for v in values):
                higher = METRICS[m]["higher_is_better"]
                rows.append(_metric_row(f"{kind} (n={n}): {label}", values, True, higher))
    return f"<table><tr><th>kind: metric</th>{head}</tr>{''.join(rows)}</table>"


ATTRIBUTION = {"retrieval_miss": "retrieval miss (the right row was not retrieved)",
               "reading_error": "reading error (the right row was there; another row or field was used)",
               "abstention_error": "abstention error (said no data wrongly, or failed to)"}


def _attribution_table(results: dict[str, dict]) -> str:
    """Wrong answers by cause, per system."""
    systems = [s for s in results if results[s].get("attribution")]
    if not systems:
        return ""
    head = "".join(f"<th>{html.escape(s)}</th>" for s in systems)
    rows = [_metric_row(label, [results[s]["attribution"].get(key) for s in systems], False, False)
            for key, label in ATTRIBUTION.items()]
    return f"<h2>Why answers were wrong</h2><table><tr><th>cause</th>{head}</tr>{''.join(rows)}</table>"


def _show(text: Any, limit: int = REPLY_CHARS) -> str:
    """Escaped display text: control characters made visible, very long text cut."""
    s = "" if text is None else str(text)
    cut = len(s) - limit
    s = s[:limit] + (f"… [{cut} more characters]" if cut > 0 else "")
    s = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", lambda m: f"\\x{ord(m[0]):02x}", s)
    return html.escape(s)


def _reply_cell(row: dict | None) -> str:
    if row is None:
        return '<td class="fail"><span class="badge">no reply recorded</span></td>'
    scores = row.get("scores") or {}
    fails = [label for key, bad, label in FAILURES if key in scores and scores[key] is bad]
    badges = "".join(f'<span class="badge">{html.escape(b)}</span>' for b in fails)
    reply = row.get("reply")
    body = _show(reply) if reply else '<span class="note">(empty)</span>'
    cls = ' class="fail"' if fails else ""
    return f"<td{cls}>{badges}{body}</td>"


def _aligned(samples: dict[str, list[dict]]) -> list[tuple[dict, dict[str, dict]]]:
    """Sample rows matched across systems by question (the n-th repeat with the n-th), in first-seen order."""
    order: list[tuple[str, int]] = []
    first: dict[tuple[str, int], dict] = {}
    per_system: dict[str, dict[tuple[str, int], dict]] = {}
    for system, rows in samples.items():
        seen: dict[str, int] = {}
        per_system[system] = {}
        for row in rows or []:
            q = str(row.get("question", ""))
            key = (q, seen.get(q, 0))
            seen[q] = key[1] + 1
            per_system[system][key] = row
            if key not in first:
                first[key] = row
                order.append(key)
    return [(first[k], {s: per_system[s].get(k) for s in samples}) for k in order]


def _samples_table(samples: dict[str, list[dict]]) -> str:
    aligned = _aligned(samples)
    if not aligned:
        return '<p class="note">No sample answers.</p>'
    head = "".join(f"<th>{html.escape(s)}</th>" for s in samples)
    rows = [
        f"<tr><td>{i}</td><td>{_show(first.get('question'))}</td><td>{_show(first.get('reference'))}</td>"
        + "".join(_reply_cell(by_system[s]) for s in samples)
        + "</tr>"
        for i, (first, by_system) in enumerate(aligned, 1)
    ]
    return f'<table class="samples"><tr><th>#</th><th>question</th><th>reference</th>{head}</tr>{"".join(rows)}</table>'


def _meta_table(meta: dict) -> str:
    if not meta:
        return ""
    shown = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()}
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_show(v)}</td></tr>" for k, v in shown.items())
    return f"<table>{rows}</table>"


def _html(data: dict) -> str:
    curve, results = data["training_curve"], data["results"]
    loss_png, pace_png = _loss_chart(curve), _pace_chart(curve)
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>collegeadvisor evaluation</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>collegeadvisor evaluation report</h1>",
        _meta_table(data["meta"]),
        "<h2>Training</h2>",
        _img(loss_png, "training loss curve") if loss_png else "",
        _img(pace_png, "training tokens per second and resident memory over the steps") if pace_png else "",
        f'<p class="note">{html.escape(curve["note"])}</p>' if curve["note"] else "",
        "<h2>Results</h2>",
    ]
    chart = _results_chart(results)
    parts.append(_img(chart, "headline metrics per system") if chart else '<p class="note">No metric values.</p>')
    parts += [
        _metrics_table(results) if results else "",
        _attribution_table(results),
        "<h2>By question kind</h2>",
        _kinds_table(results),
        "<h2>Sample answers</h2>",
        _samples_table(data["samples"]),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"
