"""Engines side by side, in one run (issue 22): the same held-out questions, resolved and retrieved as served
(`advise`), answered by
- `bare`: llama.cpp on the run's GGUF with the same prompt ids and token budget, nothing of ours in the way
  (llama-cpp-python's own `generate`, no constraint, no check);
- `llamacpp`: `--engine llamacpp` (the grounding constraint inside llama.cpp's sampling, the check, retries), which
  decodes greedy replies with prompt lookup;
- `llamacpp-token`: the same, token by token (`LlamaCpp.draft = 0`): the prompt-lookup lever on its own;
- `torch`: `--engine torch` (base + merged adapter, fp32), one question at a time as a single client sends them;
- `eval`: `--engine llamacpp` as `collegeadvisor eval` runs it (`eval.run.replies_for`: the questions handed to
  `generate.answer` 16 at a time, whose greedy replies llama.cpp decodes side by side, `LlamaCpp.parallel` at once);
  its latencies are its batches' wall times, so its figure is the total;
- `eval-alone`: the same with one reply at a time (`parallel` 1): the side-by-side lever on its own.

Any llama.cpp engine with `-avx512` after its name (`bare-avx512`, `eval-avx512`) runs without llama.cpp's AMX kernels
(`llamacpp.amx_runs` answered no), as a stock build runs on a Xeon with AMX: the AMX lever on its own.

Each engine runs in its own process, one after another (peak RSS is the process's). Reports whole-answer latency
p50/p95, generated and prompt tokens/s, peak RSS, and, for the two grounded engines, held-out accuracy as served.

    python bench/engine_bench.py --run latest --n 60            # writes the '## Engines' section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _bench import cpu_name, write_section  # noqa: E402

ENGINES = ("bare", "llamacpp", "llamacpp-token", "torch", "eval", "eval-alone")
AVX512 = "-avx512"  # an engine's name, then this: without llama.cpp's AMX kernels
EVAL_BATCH = 16  # questions a batch in `collegeadvisor eval` (its --batch-size default)
KINDS = ("numeric_correct", "yes_no_correct", "no_data_correct")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def worker(engine: str, run: Path, n: int, max_new_tokens: int, threads: int, out: Path,
           neighbours: bool = False) -> None:
    """One engine over the first n held-out questions; writes its timings and scores as JSON."""
    from collegeadvisor import advise
    from collegeadvisor.chat_format import encode_prompt, stop_token_ids, with_context
    from collegeadvisor.data.heldout import default_questions, load_questions
    from collegeadvisor.eval.metrics import score_reply
    from collegeadvisor.generate import answer
    from collegeadvisor.runs import load_engine, read_manifest, run_retriever

    name = engine
    if engine.endswith(AVX512):
        from collegeadvisor import llamacpp

        engine = engine[:-len(AVX512)]
        llamacpp.amx_runs = lambda *_: False
    manifest = read_manifest(run)
    questions = load_questions(default_questions(manifest), n)
    retrieve = run_retriever(run)
    model, tok, _ = load_engine(run, "torch" if engine == "torch" else "llamacpp", "cpu", threads=threads)
    if engine == "llamacpp-token":
        model.draft = 0
    if engine in ("eval", "eval-alone"):
        from collegeadvisor.eval.run import replies_for

        model.parallel = model.parallel if engine == "eval" else 1
        t0 = time.perf_counter()
        replies, _, timing = replies_for(model, tok, questions, max_new_tokens, EVAL_BATCH, retrieve)
        wall = time.perf_counter() - t0
        rows = [{"fixed": r.get("grounding") is None, "latency": dt, "prompt_tokens": 0, "tokens": r["n_tokens"],
                 "question": q["question"], "attempts": (r.get("grounding") or {}).get("attempts") or 1,
                 "score": score_reply(q, r["text"], True, r["n_tokens"]), "text": r["text"],
                 "status": (r.get("grounding") or {}).get("status")}
                for q, r, dt in zip(questions, replies, timing["latency_s"])]
        out.write_text(json.dumps({"engine": name, "rows": rows, "wall_s": wall,
                                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    convs = [[{"role": "user", "content": q["question"]}] for q in questions]
    plans = [advise.plan(c, retrieve, neighbours=neighbours) for c in convs]
    rows = []
    for q, c, p in zip(questions, convs, plans):
        if p.reply is not None:  # a fixed reply: no generation in any engine
            rows.append({"fixed": True, "score": score_reply(q, p.reply, True, 0), "text": p.reply})
            continue
        messages, passages = advise.model_messages(p, c), p.passages
        ids = encode_prompt(tok, with_context(messages, passages))
        t0 = time.perf_counter()
        if engine == "bare":
            new = []
            for token in model.llm.generate(ids, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                new.append(token)
                if token in stop_token_ids(tok) or len(new) >= max_new_tokens:
                    break
            text, n_tokens, attempts = tok.decode(new, skip_special_tokens=True), len(new), 1
        else:
            r = advise.finish(p, answer(model, tok, [messages], [passages], max_new_tokens=max_new_tokens,
                                        batch_size=1, expected=[p.expected or None])[0])
            text, n_tokens, attempts = r["text"], r["n_tokens"], r["grounding"].get("attempts") or 1
        dt = time.perf_counter() - t0
        rows.append({"fixed": False, "latency": dt, "prompt_tokens": len(ids), "tokens": n_tokens,
                     "question": q["question"], "first_check": None if engine == "bare" else r.get("raw_grounding"),
                     "first_text": None if engine == "bare" else r.get("raw"),
                     "attempts": attempts, "score": score_reply(q, text, True, n_tokens), "text": text,
                     "status": None if engine == "bare" else r["grounding"]["status"]})
    out.write_text(json.dumps({"engine": name, "rows": rows,
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def summary(res: dict, same_as: dict | None = None) -> dict:
    """One engine's figures; `same_as`: another engine's results, whose texts this one's are compared with."""
    gen = [r for r in res["rows"] if not r["fixed"]]
    lat = [r["latency"] for r in gen]
    acc = {}
    for key in KINDS:
        graded = [r["score"][key] for r in res["rows"] if r["score"].get(key) is not None]
        acc[key] = (100 * sum(graded) / len(graded), len(graded)) if graded else None
    total = res.get("wall_s") or sum(lat)  # eval's latencies are its batches' wall times: its total is its wall time
    return {"engine": res["engine"], "answers": len(gen), "p50": statistics.median(lat), "p95": percentile(lat, 0.95),
            "total": total, "tok_s": sum(r["tokens"] for r in gen) / total, "batched": "wall_s" in res,
            "mean_tokens": statistics.mean(r["tokens"] for r in gen),
            "mean_prompt": statistics.mean(r["prompt_tokens"] for r in gen if r["prompt_tokens"]) if any(
                r["prompt_tokens"] for r in gen) else 0,
            "retried": sum(r["attempts"] > 1 for r in gen), "rss": res["peak_rss_mb"], "acc": acc,
            "unverified": sum(r.get("status") == "unverified" for r in gen),
            "same": None if same_as is None else sum(a["text"] == b["text"] for a, b in zip(
                res["rows"], same_as["rows"]) if not a["fixed"])}


def table(sums: list[dict]) -> str:
    base = next((s for s in sums if s["engine"] == "bare"), None)
    lines = ["| engine | answers | p50 s | p95 s | total s | vs bare (p50 / p95 / total) | generated tok/s | mean "
             "tokens | retried | peak RSS MB | figures | yes/no | no data | unverified | same text as "
             "llamacpp-token |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in sums:
        ratio = "-" if base is None or s is base else (
            f"- / - / {s['total'] / base['total']:.2f}x" if s["batched"] else
            f"{s['p50'] / base['p50']:.2f}x / {s['p95'] / base['p95']:.2f}x / {s['total'] / base['total']:.2f}x")
        p50, p95 = ("-", "-") if s["batched"] else (f"{s['p50']:.2f}", f"{s['p95']:.2f}")
        acc = [("-" if s["engine"].startswith("bare") or s["acc"][k] is None else f"{s['acc'][k][0]:.1f}% of {s['acc'][k][1]}")
               for k in KINDS]
        lines.append(f"| {s['engine']} | {s['answers']} | {p50} | {p95} | {s['total']:.1f} | {ratio} | "
                     f"{s['tok_s']:.1f} | {s['mean_tokens']:.0f} | {s['retried']} | {s['rss']:.0f} | "
                     + " | ".join(acc) + f" | {'-' if s['engine'].startswith('bare') else s['unverified']} | "
                     + ("-" if s["same"] is None else f"{s['same']} of {s['answers']}") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="latest")
    p.add_argument("--output-dir", default="runs")
    p.add_argument("--n", type=int, default=60, help="held-out questions")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--write", action="store_true", help="write the '## Engines' section of BENCHMARKS.md")
    p.add_argument("--keep", help="a folder to keep each engine's answers in (ENGINE.json)")
    p.add_argument("--neighbours", action="store_true",
                   help="pad the rows asked about with retrieved ones up to k (served prompts hold the asked rows "
                        "alone)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from collegeadvisor.runs import find_run

    run = find_run(args.run, args.output_dir)
    if args.worker:
        worker(args.worker, run, args.n, args.max_new_tokens, args.threads, Path(args.worker_out),
               neighbours=args.neighbours)
        return 0
    sums, results = [], {}
    engines = args.engines.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for engine in sorted(engines, key=lambda e: e != "llamacpp-token"):  # the texts the others are compared with
            out = Path(tmp) / f"{engine}.json"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--run", str(run), "--n", str(args.n), "--max-new-tokens",
                            str(args.max_new_tokens), "--threads", str(args.threads), "--worker", engine,
                            "--worker-out", str(out)] + ["--neighbours"] * args.neighbours, check=True)
            results[engine] = json.loads(out.read_text())
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                (Path(args.keep) / out.name).write_text(out.read_text())
            sums.append(summary(results[engine], None if engine in ("llamacpp-token", "bare")
                                or engine.startswith(("eval", "bare")) else results.get("llamacpp-token")))
            print(f"{engine}: {time.perf_counter() - t0:.0f} s in all", file=sys.stderr, flush=True)
            print(table(sums).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(sums))
    if args.write:
        body = (f"`python bench/engine_bench.py --run {args.run} --n {args.n} --threads {args.threads}` on run "
                f"`{run.name}`, {cpu_name()}, {args.threads} threads, resolved as served against the full knowledge base "
                f"({'the asked rows padded with retrieved neighbours to k = 3' if args.neighbours else 'the asked rows alone'}, prompts of {statistics.mean(s['mean_prompt'] for s in sums if s['mean_prompt']):.0f} tokens on average) and a "
                f"budget of {args.max_new_tokens} new tokens. One question at a time, each engine in its own process, "
                "one after another; fixed replies (no row, off topic, ...) generate nothing and are left out of the "
                "timings but not of the accuracy. `bare`: llama-cpp-python's `generate` on the same GGUF (q8_0) and "
                "prompt ids, nothing of ours; `llamacpp`: `--engine llamacpp`, grounded (constraint, check, "
                "retries), greedy replies decoded with prompt lookup; `llamacpp-token`: the same token by token; "
                "`torch`: `--engine torch`, fp32, merged adapter.\n\n" + table(sums))
        write_section("Engines", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
