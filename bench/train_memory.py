"""Training memory and speed over a run (issue 23): the same training, once per variant, each in its own process
one after another, read back from the run's metrics.jsonl (rss_mb and tokens_per_s at every log_every steps).

Variants, each a lever on its own:
  default     glibc's malloc, passes padded to their longest example (COLLEGEADVISOR_JEMALLOC=0: the CLI now preloads
              jemalloc itself where it is installed);
  jemalloc    the same with Debian's libjemalloc2 through LD_PRELOAD (apt install libjemalloc2);
  tcmalloc    the same with Debian's libtcmalloc-minimal4 through LD_PRELOAD (apt install libtcmalloc-minimal4);
  buckets     passes padded to a multiple of 64 tokens (pad_to_multiple_of: 64): a few pass shapes, not one per length;
  jemalloc-decay1s  jemalloc returning freed pages to the OS after 1 s instead of its default 10 s
              (MALLOC_CONF=dirty_decay_ms:1000,muzzy_decay_ms:0): less memory held between passes, more page faults;
  jemalloc-1arena   jemalloc with one arena for all threads (MALLOC_CONF=narenas:1; its default is 4 per CPU): the
              kernels' worker threads reuse the main thread's freed blocks;
  jemalloc-keep-mlp  jemalloc with the MLP's gate and up kept for backward in every layer (recompute_mlp: 0; the
              default recomputes them in every other layer);
  jemalloc-recompute-all  jemalloc with gate and up recomputed in every layer (recompute_mlp: 1);
  jemalloc-caches-1024  jemalloc with oneDNN's primitive cache and ideep's matmul cache at their defaults, 1,024
              entries each (ONEDNN_PRIMITIVE_CACHE_CAPACITY, LRU_CACHE_CAPACITY; the CLI now sets 128): each pass
              length compiles ~55 matmul kernels, and both caches keep them.

    python bench/train_memory.py --data out/quickstart/data/scorecard.jsonl --steps 50     # ~5 minutes a variant
    python bench/train_memory.py ... --write      # writes the section of BENCHMARKS.md

The config is configs/advisor.yaml (batch 4 x grad_accum 2, max_length 640) without samples or checkpoints.
Reports RSS at 25/50/75/100% of the run (read between steps), the peak (the process's high-water mark, which also
counts the peaks inside steps) at the end and its ratio to the peak at step 50 (or the first logged), and real
tokens/s over the first and the last fifth of the logged steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import cpu_name, write_section  # noqa: E402

ALLOCATORS = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
# variant: (allocator preloaded, its settings, extra train arguments[, environment])
VARIANTS = {"default": (None, None, []), "jemalloc": ("jemalloc", None, []), "tcmalloc": ("tcmalloc", None, []),
            "buckets": (None, None, ["--pad-to-multiple-of", "64"]),
            "jemalloc-decay1s": ("jemalloc", "dirty_decay_ms:1000,muzzy_decay_ms:0", []),
            "jemalloc-1arena": ("jemalloc", "narenas:1", []),
            "jemalloc-keep-mlp": ("jemalloc", None, ["--recompute-mlp", "0"]),
            "jemalloc-recompute-all": ("jemalloc", None, ["--recompute-mlp", "1"]),
            "jemalloc-caches-1024": ("jemalloc", None, [], {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024",
                                                             "LRU_CACHE_CAPACITY": "1024"})}
LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")


def allocator(name: str) -> str | None:
    return next((str(Path(d) / ALLOCATORS[name]) for d in LIBDIRS if (Path(d) / ALLOCATORS[name]).is_file()), None)


def run_variant(variant: str, args, out: Path) -> dict | None:
    env = dict(os.environ, COLLEGEADVISOR_JEMALLOC="0")  # the CLI would preload jemalloc itself where installed
    env.pop("LD_PRELOAD", None)
    env.pop("MALLOC_CONF", None)
    preload, conf, extra, *environment = VARIANTS[variant]
    env.update(*environment)
    if preload:
        lib = allocator(preload)
        if lib is None:
            print(f"{variant}: {ALLOCATORS[preload]} is not installed; skipped", file=sys.stderr)
            return None
        env["LD_PRELOAD"] = lib
    if conf:
        env["MALLOC_CONF"] = conf
    cli = Path(sys.executable).with_name("collegeadvisor")
    cmd = [str(cli), "train", "--config", args.config, "--data", args.data, "--max-steps", str(args.steps),
           "--output-dir", str(out), "--run-name", variant, "--sample-every", "0", "--save-every", "100000",
           "--log-every", str(args.log_every), "--force", *extra]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / variant / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "rss_mb" in r]
    at = lambda q: logged[min(len(logged) - 1, max(0, round(q * len(logged)) - 1))]["rss_mb"]  # noqa: E731
    base = next((r for r in logged if r["step"] >= 50), logged[0])
    fifth = max(1, len(logged) // 5)
    peak = lambda r: r.get("peak_rss_mb") or r["rss_mb"]  # noqa: E731  (runs logged before peaks were)
    return {"variant": variant, "steps": logged[-1]["step"], "rss": [at(q) for q in (0.25, 0.5, 0.75, 1.0)],
            "peak": peak(logged[-1]), "vs50": peak(logged[-1]) / peak(base), "base_step": base["step"],
            "tps_first": sum(r["tokens_per_s"] for r in logged[:fifth]) / fifth,
            "tps_last": sum(r["tokens_per_s"] for r in logged[-fifth:]) / fifth}


def table(results: list[dict]) -> str:
    lines = ["| variant | steps | RSS at 25 / 50 / 75 / 100% (GB) | peak GB | peak at end / at step 50 | tokens/s first "
             "/ last fifth | last vs first |", "| --- | ---: | --- | ---: | ---: | --- | ---: |"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['steps']} | {' / '.join(f'{v / 1024:.2f}' for v in r['rss'])} | "
                     f"{r['peak'] / 1024:.2f} | {r['vs50']:.2f} (step {r['base_step']}) | {r['tps_first']:.0f} / "
                     f"{r['tps_last']:.0f} | {r['tps_last'] / r['tps_first'] - 1:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/advisor.yaml")
    p.add_argument("--data", required=True, help="training data (the advisor dataset)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--write", action="store_true", help="write the section of BENCHMARKS.md")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: no variant {', '.join(unknown)} (of {', '.join(VARIANTS)})")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            r = run_variant(variant, args, Path(tmp))
            if r is not None:
                results.append(r)
                print(table(results).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(results))
    if args.write:
        write_section("Training memory over a run, by lever (issue 23)",
                      f"`python bench/train_memory.py --data {args.data} --steps {args.steps} --variants "
                      f"{args.variants}` on {cpu_name()}, each variant in its own process, one after another, nothing "
                      f"else running: `{args.config}` (batch 4 x grad_accum 2, max_length 640) without samples or "
                      "checkpoints; RSS and tokens/s as the run logged them every "
                      f"{args.log_every} steps (metrics.jsonl).\n\n" + table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
