"""`make reliability`: the whole reliability and security suite, one summary table.

Kills with exact resume (training, dataset builder, kb build, export), SIGTERM / Ctrl-C, disk faults, hostile
files, fuzzed dataset records and the server under load and attack: each part is a module beside this one
(kill_resume, faults, fuzz_data, serve_load) and has a short version in tests/test_reliability_*.py. Every row of
the table must read 100%; the exit status is 1 otherwise.

    python bench/reliability.py                       # prints the table; details in out/reliability/results.json
    python bench/reliability.py --write RELIABILITY.md   # and records it there
    python bench/reliability.py --only train,serve --quick
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import faults  # noqa: E402
import fuzz_data  # noqa: E402
import kill_resume  # noqa: E402
import serve_load  # noqa: E402

from collegeadvisor.fsutil import atomic_write_json, atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("train", "signals", "dataset", "kb", "export", "disk", "hostile", "fuzz", "serve")
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"


def pct(good: int, total: int) -> str:
    """100% only when every case passed (99.96% is not rounded up)."""
    if not total:
        return "n/a"
    return "100%" if good == total else f"{int(1000 * good / total) / 10:.1f}%"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------ rows
def row_train(r: dict) -> tuple[str, str, int, int]:
    ev = r["events"]
    exact = r["kills"] if r["exact"] else 0
    return ("Training: SIGKILL at random moments, --resume exact",
            f"{r['kills']} kills in one {r['steps_compared']}-step run ({r['mid_write']} mid checkpoint write, "
            f"steps {', '.join(str(e['logged_steps']) for e in ev)}); loss diff {r['max_loss_diff']} at "
            f"{r['steps_compared']}/{r['steps_compared']} steps, same adapter bytes: {r['same_adapter_bytes']}",
            exact, max(r["kills"], 5))


def row_signals(r: dict) -> tuple[str, str, int, int]:
    stops = ", ".join(f"{s['signal']} exit {s['exit_code']} at step {s['paused_at']}" for s in r["stops"])
    good = sum(s["ok"] for s in r["stops"]) if r.get("exact") else 0
    return ("Training: SIGTERM and Ctrl-C save a checkpoint and exit", f"{stops}; resumed run exact: {r.get('exact')}",
            good, len(r["stops"]))


def row_kills(name: str, r: dict, detail: str) -> tuple[str, str, int, int]:
    good = sum(e["killed"] and e["published_ok"] for e in r["events"]) if r.get("same") else 0
    return (f"{name}: SIGKILL, rerun ends identical", f"{r['kills']} kills; {detail}", good, max(r["kills"], 3))


def row_disk(results: list[dict]) -> tuple[str, str, int, int]:
    names = "; ".join(r["name"] for r in results)
    return ("Disk faults (ENOSPC, EIO, EFBIG) with nothing lost", names, sum(r["ok"] for r in results), len(results))


def row_hostile(results: list[dict]) -> tuple[str, str, int, int]:
    kinds = {"pickles (none ran)": 0, "symlinks out": 0, "tampered hashes": 0, "paths out of their folder": 0,
             "other": 0}
    for r in results:
        n = r["name"]
        kind = ("pickles (none ran)" if "pickle" in n else "symlinks out" if "symlink" in n else "tampered hashes"
                if ("sha256" in n or "hash" in n) else "paths out of their folder" if ("outside" in n or "out of" in n)
                else "other")
        kinds[kind] += 1
    detail = f"{len(results)} files: " + ", ".join(f"{v} {k}" for k, v in kinds.items() if v)
    return ("Hostile files refused with a clear message", detail, sum(r["ok"] for r in results), len(results))


def row_fuzz(r: dict) -> tuple[str, str, int, int]:
    total = r["valid_records"] + r["bad_records"]
    bad = r["tracebacks"] + r["failures"]
    return ("Fuzzed dataset records (hypothesis): 0 tracebacks",
            f"{r['valid_records']} valid-but-awkward records loaded exactly, {r['bad_records']} bad ones each named at "
            f"file:line ({len(r['bad_kinds'])} kinds of fault); {r['tracebacks']} tracebacks, {r['failures']} misses",
            total - bad, total)


def row_serve(r: dict) -> tuple[str, str, int, int]:
    rss, load = r["rss"], r["load"]
    detail = (f"{r['served']} requests, 32 clients: {r['5xx']} 5xx, {r['auth']['bypasses']} auth bypasses in "
              f"{r['auth']['requests']} wrong-key probes; p50 {load['p50_s']} s / p95 {load['p95_s']} s "
              f"({load['requests']} chats, half streamed); {r['hangups']['dropped']} hang-ups then 8 requests in "
              f"{r['hangups']['then_8_requests_s']} s; {r['stalls']['stalled']} stalled connections cut off (408); "
              f"{len(r['limits']['cases'])} limit probes as expected: {r['limits']['ok']}; RSS {rss['start_mb']} -> "
              f"{rss['after_mb']} MB, +{rss['second_round_growth_mb']} MB over a second round")
    checks = [r["5xx"] == 0, r["auth"]["ok"], r["hangups"]["ok"], r["stalls"]["ok"], r["limits"]["ok"],
              rss["second_round_growth_mb"] < 50, r["tracebacks_in_log"] == 0]
    return ("Server under load and attack (0 5xx, 0 auth bypasses)", detail, sum(checks), len(checks))


# ------------------------------------------------------------------------------------------ run
def run_parts(parts: list[str], work: Path, quick: bool, log=print) -> dict:
    results = {}
    jobs = {
        "train": lambda: kill_resume.train_kills(work, kills=5, steps=30, log=log),
        "signals": lambda: kill_resume.signal_stops(work, steps=30, log=log),
        "dataset": lambda: kill_resume.dataset_kills(work, kills=3, n=2000 if quick else 4000, log=log),
        "kb": lambda: kill_resume.kb_kills(work, kills=3, limit=1200 if quick else 3000, log=log),
        "export": lambda: kill_resume.export_kills(work, kills=3, log=log),
        "disk": lambda: [s(work) for s in faults.DISK],
        "hostile": lambda: [r for group in faults.HOSTILE for r in group(work)],
        "fuzz": lambda: fuzz_data.run(examples=300 if quick else 1000),
        "serve": lambda: serve_load.run(None, work / "serve", requests=120 if quick else 240, log=log),
    }
    for name in parts:
        t0 = time.perf_counter()
        log(f"== {name}")
        results[name] = {"result": jobs[name](), "seconds": round(time.perf_counter() - t0, 1)}
        log(f"   {name}: {results[name]['seconds']} s")
    return results


def table(results: dict) -> tuple[str, bool]:
    makers = {"train": row_train, "signals": row_signals,
              "dataset": lambda r: row_kills("Dataset builder", r, f"{r.get('rows')} rows, same sha256: {r.get('same')}"),
              "kb": lambda r: row_kills("kb build", r, f"{r.get('rows')} rows, {r.get('duplicates')} duplicated, "
                                        f"{r.get('missing')} missing, same documents; vectors cosine >= "
                                        f"{r.get('min_vector_cosine')}"),
              "export": lambda r: row_kills("export --to merged", r, f"{r.get('files')} files, same sha256: "
                                            f"{r.get('same')}"),
              "disk": row_disk, "hostile": row_hostile, "fuzz": row_fuzz, "serve": row_serve}
    lines = ["| check | what happened | passed |", "| --- | --- | --- |"]
    ok = True
    for name, item in results.items():
        title, detail, good, total = makers[name](item["result"])
        ok = ok and total > 0 and good == total
        lines.append(f"| {title} | {detail} | {good}/{total} = {pct(good, total)} |")
    return "\n".join(lines), ok


def write_doc(path: Path, text: str) -> None:
    doc = path.read_text() if path.is_file() else f"# Reliability\n\n{BEGIN}\n{END}\n"
    block = f"{BEGIN}\n{text}\n{END}"
    doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S) if BEGIN in doc else (
        doc.rstrip() + "\n\n" + block + "\n")
    atomic_write_text(path, doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {', '.join(PARTS)}")
    ap.add_argument("--quick", action="store_true", help="smaller kb, dataset, fuzz and load rounds")
    ap.add_argument("--work", default=None, help="scratch folder [default: a new temporary one]")
    ap.add_argument("--out", default=str(ROOT / "out" / "reliability"))
    ap.add_argument("--write", default=None, metavar="MD", help="record the table in this Markdown file")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="collegeadvisor-reliability-"))
    t0 = time.perf_counter()
    results = run_parts(parts, work, args.quick)
    text, ok = table(results)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"Run {when} on {cpu_name()} ({platform.system()}, Python {platform.python_version()}), "
              f"{time.perf_counter() - t0:.0f} s{' (--quick)' if args.quick else ''}.\n\n")
    print("\n" + header + text)
    out = Path(args.out)
    atomic_write_json(out / "results.json", {"when": when, "cpu": cpu_name(), "ok": ok, "results": results})
    atomic_write_text(out / "summary.md", header + text + "\n")
    if args.write:
        write_doc(Path(args.write), header + text)
    print(f"\n{'all rows 100%' if ok else 'NOT ALL ROWS 100%'}; details: {out / 'results.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
