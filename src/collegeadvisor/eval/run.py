"""`collegeadvisor eval`: held-out questions answered by base and tuned models loaded from a run's manifest."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from collegeadvisor import advise
from collegeadvisor.chat_format import IGNORE_INDEX
from collegeadvisor.config import MAX_NEW_TOKENS
from collegeadvisor.data.heldout import default_questions, load_questions
from collegeadvisor.data.loaders import load_examples
from collegeadvisor.data.prepare import encode_examples
from collegeadvisor.eval.metrics import aggregate, score_reply
from collegeadvisor.eval.report import write_report
from collegeadvisor.errors import AdvisorError
from collegeadvisor.generate import RETRIES, answer, is_engine
from collegeadvisor.kb import Retriever
from collegeadvisor.runs import load_engine, load_run
from collegeadvisor.train.batching import collate
from collegeadvisor.train.model import LabelLoss


def perplexity(model, tokenizer, examples: list[dict], max_length: int, batch_size: int = 8) -> float | None:
    """exp(mean loss on assistant tokens) over validation examples, through chat_format."""
    rows, _ = encode_examples(tokenizer, examples, max_length, "truncate")
    if not rows:
        return None
    device = next(model.parameters()).device
    loss = LabelLoss(model, fused=False)  # the training loss, logits at labelled positions only
    total, count = 0.0, 0
    with torch.inference_mode():
        for b in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[b : b + batch_size], tokenizer.pad_token_id).items()}
            total += float(loss(**batch))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return math.exp(min(total / max(count, 1), 50))


@contextlib.contextmanager
def adapter_state(model, on: bool):
    """The tuned model with its LoRA weights merged in while `on` (the same greedy text, ~30% faster generation
    on CPU than LoRA's side path), the base model while not. An engine (a GGUF export) is the tuned model."""
    if is_engine(model):
        yield
        return
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


def replies_for(model, tokenizer, questions: list[dict], max_new_tokens: int, batch_size: int,
                retriever: Retriever | None = None, retries: int = RETRIES) -> tuple[list[dict], list[list[dict]], dict]:
    """Answers as served (`advise`: resolve, find the asked rows, decide, then `generate.answer` with its
    constraint, check and retries), the hits each was answered from, per-question latency (the wall time of its
    batch) and generated tokens/s. Without a retriever, the questions go to the model as they are."""
    convs = [[{"role": "user", "content": q["question"]}] for q in questions]
    plans = [advise.plan(c, retriever) for c in convs] if retriever else [None] * len(convs)
    replies: list[dict | None] = [advise.fixed_result(p) if p and p.reply is not None else None for p in plans]
    todo = [i for i, r in enumerate(replies) if r is None]
    latency = [0.0] * len(convs)
    start = time.perf_counter()
    for b in tqdm(range(0, len(todo), batch_size), desc="eval", unit="batch", disable=None, leave=False):
        idx, t = todo[b : b + batch_size], time.perf_counter()
        out = answer(model, tokenizer, [advise.model_messages(plans[i], convs[i]) if plans[i] else convs[i]
                                        for i in idx],
                     [plans[i].passages if plans[i] else None for i in idx], max_new_tokens=max_new_tokens,
                     batch_size=batch_size, retries=retries,
                     expected=[plans[i].expected or None if plans[i] else None for i in idx])
        dt = time.perf_counter() - t
        for i, r in zip(idx, out):
            replies[i], latency[i] = advise.finish(plans[i], r) if plans[i] else r, dt
    elapsed = time.perf_counter() - start
    tokens = sum(r["n_tokens"] for r in replies)
    hits = [p.hits if p else [] for p in plans]
    for r, p in zip(replies, plans):
        if p is not None:
            r["resolution"] = p.describe()
    return replies, hits, {"latency_s": latency, "tokens_per_s": tokens / max(elapsed, 1e-9)}


def _scored(questions, replies, hits, text_key: str) -> list[dict]:
    return [score_reply(q, r[text_key], r["stopped"], r["n_tokens"],
                        passages=[h["document"] for h in hs] if r.get("grounding") else None,
                        hit_ids=[str(h["id"]) for h in hs] if r.get("grounding") else None)
            for q, r, hs in zip(questions, replies, hits)]


def _sample_rows(questions, replies, hits, scores, text_key: str) -> list[dict]:
    return [{"question": q["question"], "reference": q["answer"], "kind": q["kind"], "reply": r[text_key],
             "grounding": (r.get("grounding") or {}).get("status") if text_key == "text" else
             (r.get("raw_grounding") or {}).get("status"),
             "rows": [str(h["id"]) for h in hs], "scores": s,
             "resolution": {k: (r.get("resolution") or {}).get(k) for k in ("decision", "why", "rows")}}
            for q, r, hs, s in zip(questions, replies, hits, scores)]


def evaluate(run_dir: Path, questions_path: Path | None = None, out_dir: Path | None = None, compare: bool = False,
             retriever: Retriever | None = None, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16,
             limit: int | None = None, val_limit: int = 200, device: str = "auto", log=print,
             base_max_new_tokens: int | None = None, engine: str = "torch", **engine_options) -> tuple[Path, Path]:
    """Score the run (and with `compare` its base model) on held-out questions, through retrieval when a retriever
    is given: the model's raw answers, and the answers as served after the check and its retries. `engine`
    llamacpp or openai answers with the run's export (`engine_options`: runs.load_engine's; no perplexity: that is
    torch's loss, and no base model to compare)."""
    if engine != "torch" and compare:
        raise AdvisorError("eval --compare runs the base model without the adapter: it needs --engine torch")
    if engine == "torch":
        model, tokenizer, manifest = load_run(run_dir, device=device)
    else:
        model, tokenizer, manifest = load_engine(run_dir, engine, **engine_options)
    questions_path = Path(questions_path) if questions_path else default_questions(manifest)
    questions = load_questions(questions_path, limit)
    val_path = Path(run_dir) / "data" / "val.jsonl"
    val = load_examples(val_path)[0][:val_limit] if val_path.is_file() and val_path.stat().st_size else []
    tag = "+rag" if retriever is not None else ""
    systems: list[tuple[str, bool]] = [("tuned", True)]
    if compare:
        systems.insert(0, ("base", False))
    results, samples, ppl_of = {}, {}, {}  # perplexity depends on the weights only: once per adapter state
    for name, adapter_on in systems:
        log(f"eval: {name}{tag} on {len(questions)} questions from {questions_path}")
        budget = max_new_tokens if adapter_on else (base_max_new_tokens or max_new_tokens)
        with adapter_state(model, adapter_on):
            # the base model is scored on its raw answers only: its retries would cost twice its generation
            replies, hits, timing = replies_for(model, tokenizer, questions, budget, batch_size, retriever,
                                                RETRIES if adapter_on else 0)
            if adapter_on not in ppl_of:
                ppl_of[adapter_on] = (perplexity(model, tokenizer, val, manifest["max_length"])
                                      if val and engine == "torch" else None)
        views = [("raw", "raw")] + ([("served", "text")] if retriever is not None and adapter_on else [])
        for view, key in views:
            label = f"{name}{tag}" + (" (served)" if view == "served" else "")
            scores = _scored(questions, replies, hits, key)
            results[label] = aggregate(scores, {"perplexity": ppl_of[adapter_on], **timing})
            samples[label] = _sample_rows(questions, replies, hits, scores, key)
    out_dir = Path(out_dir) if out_dir else Path(run_dir) / "eval"
    meta = {"run": str(Path(run_dir).resolve()), "questions": str(questions_path), "base_model": manifest["base_model"]["spec"],
            "template_sha256": manifest["format"]["template_sha256"], "max_new_tokens": max_new_tokens,
            "engine": model.describe() if is_engine(model) else engine,
            "n_questions": len(questions), "retrieval": retriever is not None}
    return write_report(out_dir, results, samples, metrics_jsonl=Path(run_dir) / "metrics.jsonl", meta=meta)
