"""Batched eval generation vs the seed's one-question-at-a-time loop, on the same prompts (greedy).

    python bench/eval_throughput.py [--run latest|DIR] [--n 64] [--max-new-tokens 64] [--batch-size 32]

Prints generated tokens/s for both, their ratio and whether the greedy texts are identical, and writes the
`## Eval generation` section of BENCHMARKS.md. Without a run it uses the embedded base model.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import write_section  # noqa: E402

from collegeadvisor.chat_format import encode_prompt, stop_token_ids  # noqa: E402
from collegeadvisor.generate import generate  # noqa: E402


def seed_loop(model, tok, convs, max_new_tokens):
    """What the seed's test script did: one prompt at a time, no batching."""
    out = []
    for c in convs:
        ids = torch.tensor([encode_prompt(tok, c)])
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:].tolist()
        stops = [i for i, t in enumerate(new) if t in stop_token_ids(tok)]
        new = new[: stops[0]] if stops else new
        out.append({"text": tok.decode(new, skip_special_tokens=True).strip(), "n_tokens": len(new)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--questions", default="out/quickstart/data/heldout.jsonl")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    if args.run:
        from collegeadvisor.runs import find_run, load_run

        model, tok, _ = load_run(find_run(args.run, "runs"), merge=True)  # as eval generates
        label = f"run {args.run}"
    else:
        from collegeadvisor.models import load_model, load_tokenizer, resolve_base_model

        path = resolve_base_model("embedded:smollm2-135m-instruct")
        model, tok, label = load_model(path, dtype=torch.float32).eval(), load_tokenizer(path), "embedded base model"
    qpath = Path(args.questions)
    if qpath.is_file():
        questions = [json.loads(l)["question"] for l in qpath.read_text().splitlines() if l.strip()][: args.n]
    else:
        from collegeadvisor.data.scorecard import build_scorecard_dataset

        build_scorecard_dataset(Path("/tmp/bench-eval-data"), n_examples=100, n_heldout=args.n)
        questions = [json.loads(l)["question"] for l in Path("/tmp/bench-eval-data/heldout.jsonl").read_text().splitlines()][: args.n]
    convs = [[{"role": "user", "content": q}] for q in questions]
    generate(model, tok, convs[:2], max_new_tokens=4)  # warm-up

    t = time.perf_counter()
    seed = seed_loop(model, tok, convs, args.max_new_tokens)
    seed_s = time.perf_counter() - t
    t = time.perf_counter()
    ours = generate(model, tok, convs, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    ours_s = time.perf_counter() - t

    seed_tps = sum(r["n_tokens"] for r in seed) / seed_s
    ours_tps = sum(r["n_tokens"] for r in ours) / ours_s
    same = sum(a["text"] == b["text"] for a, b in zip(seed, ours))
    ratio = ours_tps / seed_tps
    rows = [
        "| loop | seconds | generated tokens | tokens/s |",
        "| --- | --- | --- | --- |",
        f"| seed: one question at a time | {seed_s:.1f} | {sum(r['n_tokens'] for r in seed)} | {seed_tps:.1f} |",
        f"| ours: batched {args.batch_size}, left padding, KV cache | {ours_s:.1f} | {sum(r['n_tokens'] for r in ours)} | {ours_tps:.1f} |",
    ]
    body = "\n".join([
        f"{len(convs)} held-out questions, greedy, max {args.max_new_tokens} new tokens, {label}, fp32, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}.",
        "", *rows, "",
        f"Speed-up: **{ratio:.1f}x** (goal: at least 5x). Identical greedy text: {same}/{len(convs)}.",
    ])
    write_section("Eval generation", body)
    print("\n".join(rows))
    print(f"ratio={ratio:.2f} identical={same}/{len(convs)}")


if __name__ == "__main__":
    main()
