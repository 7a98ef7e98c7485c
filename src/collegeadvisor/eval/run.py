"""`collegeadvisor eval`: held-out questions answered by base and tuned models loaded from a run's manifest."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from collegeadvisor.chat_format import IGNORE_INDEX, with_context
from collegeadvisor.data.loaders import load_examples
from collegeadvisor.data.prepare import encode_examples
from collegeadvisor.errors import AdvisorError, DataError
from collegeadvisor.eval.metrics import aggregate, score_reply
from collegeadvisor.eval.report import write_report
from collegeadvisor.generate import generate
from collegeadvisor.runs import load_run
from collegeadvisor.train.batching import collate

QUESTION_FIELDS = ("question", "answer", "numeric", "kind")
Retriever = Callable[[str], Sequence[str]]


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--questions: {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{n}: malformed JSON ({exc.msg})") from exc
        missing = [f for f in QUESTION_FIELDS if f not in rec]
        if missing:
            raise DataError(f"{path}:{n}: question record is missing field '{missing[0]}'")
        out.append(rec)
    return out[:limit] if limit else out


def default_questions(manifest: dict) -> Path:
    data = Path(manifest["data"]["path"])
    path = data.with_name("heldout.jsonl")
    if not path.is_file():
        raise AdvisorError(f"no held-out file beside {data}; pass --questions FILE (written by `collegeadvisor data scorecard`)")
    return path


def perplexity(model, tokenizer, examples: list[dict], max_length: int, batch_size: int = 8) -> float | None:
    """exp(mean loss on assistant tokens) over validation examples, through chat_format."""
    rows, _ = encode_examples(tokenizer, examples, max_length, "truncate")
    if not rows:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[b : b + batch_size], tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            targets = batch["labels"][:, 1:]
            keep = targets != IGNORE_INDEX
            total += float(torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum"))
            count += int(keep.sum())
    return math.exp(min(total / max(count, 1), 50))


@contextlib.contextmanager
def adapter_state(model, on: bool):
    """The tuned model with its LoRA weights merged in while `on` (the same greedy text, ~30% faster generation
    on CPU than LoRA's side path), the base model while not."""
    if not on:
        with model.disable_adapter():  # unmerges first if merged
            yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        if any(getattr(m, "merged", False) for m in model.modules()):  # a base context inside may have unmerged
            model.unmerge_adapter()


def answer(model, tokenizer, questions: list[dict], max_new_tokens: int, batch_size: int,
           retriever: Retriever | None = None) -> tuple[list[dict], dict]:
    """Replies, per-question latency (the wall time of the batch it was in) and generated tokens/s."""
    convs = []
    for q in questions:
        msgs = [{"role": "user", "content": q["question"]}]
        convs.append(with_context(msgs, retriever(q["question"])) if retriever else msgs)
    replies, latency = [], []
    start = time.perf_counter()
    for b in range(0, len(convs), batch_size):
        t = time.perf_counter()
        out = generate(model, tokenizer, convs[b : b + batch_size], max_new_tokens=max_new_tokens, batch_size=batch_size)
        dt = time.perf_counter() - t
        replies += out
        latency += [dt] * len(out)
    elapsed = time.perf_counter() - start
    tokens = sum(r["n_tokens"] for r in replies)
    return replies, {"latency_s": latency, "tokens_per_s": tokens / max(elapsed, 1e-9)}


def evaluate(run_dir: Path, questions_path: Path | None = None, out_dir: Path | None = None, compare: bool = False,
             retriever: Retriever | None = None, max_new_tokens: int = 128, batch_size: int = 16,
             limit: int | None = None, val_limit: int = 200, device: str = "auto", log=print) -> tuple[Path, Path]:
    model, tokenizer, manifest = load_run(run_dir, device=device)
    questions_path = Path(questions_path) if questions_path else default_questions(manifest)
    questions = load_questions(questions_path, limit)
    val_path = Path(run_dir) / "data" / "val.jsonl"
    val = load_examples(val_path)[0][:val_limit] if val_path.is_file() and val_path.stat().st_size else []
    systems: list[tuple[str, bool, Retriever | None]] = [("tuned", True, None)]
    if compare:
        systems.insert(0, ("base", False, None))
    if retriever is not None:
        systems.append(("tuned+rag", True, retriever))
    results, samples, ppl_of = {}, {}, {}  # perplexity depends on the weights only: once per adapter state
    for name, adapter_on, retr in systems:
        log(f"eval: {name} on {len(questions)} questions from {questions_path}")
        with adapter_state(model, adapter_on):
            replies, timing = answer(model, tokenizer, questions, max_new_tokens, batch_size, retr)
            if adapter_on not in ppl_of:
                ppl_of[adapter_on] = perplexity(model, tokenizer, val, manifest["max_length"]) if val else None
            ppl = ppl_of[adapter_on]
        scores = [score_reply(q, r["text"], r["stopped"], r["n_tokens"]) for q, r in zip(questions, replies)]
        results[name] = aggregate(scores, {"perplexity": ppl, **timing})
        samples[name] = [{"question": q["question"], "reference": q["answer"], "kind": q["kind"], "reply": r["text"],
                          "scores": s} for q, r, s in zip(questions, replies, scores)]
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    meta = {"run": str(Path(run_dir).resolve()), "questions": str(questions_path), "base_model": manifest["base_model"]["spec"],
            "template_sha256": manifest["format"]["template_sha256"], "max_new_tokens": max_new_tokens,
            "n_questions": len(questions)}
    return write_report(out_dir, results, samples, metrics_jsonl=Path(run_dir) / "metrics.jsonl", meta=meta)
