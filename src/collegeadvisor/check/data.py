"""Data checks: the examples train picks (data.loaders.train_val, as train picks them), enough different ones to
train on (data.loaders.unique_examples, the rule `data validate` applies), the share of labelled tokens, and token
lengths per split against max_length (a histogram, answers cut, the max_length covering 99%)."""

from __future__ import annotations

import math
from typing import Sequence

from collegeadvisor.check.findings import LISTED, Finding, finding, plural
from collegeadvisor.data.loaders import load_examples, train_val, unique_examples
from collegeadvisor.data.prepare import labelled_count, length_report
from collegeadvisor.errors import DataError

CUT_ERROR_SHARE = 0.01  # above this share of training examples with answers cut at max_length: an error


def select_examples(cfg) -> tuple[dict[str, tuple[str, list[dict]]], list[dict], list[Finding]]:
    """The examples `train` would use, as train/prepare_data picks them: ({split: (file, examples)}, every loaded
    example (for text scans), findings for unreadable records, copies, and too few different examples to train on)."""
    findings: list[Finding] = []

    def load(path: str, training: bool = False) -> list[dict]:
        repeated: list[str] = []
        try:
            examples, problems = load_examples(path, strict=False, warnings=repeated)
        except DataError as exc:
            where, _, msg = str(exc).partition(": ")
            findings.append(finding("error", "format", where, msg, "fix the file; `collegeadvisor data validate FILE` "
                                    "lists every problem", "unreadable"))
            return []
        for p in problems:
            where, _, msg = p.partition(": ")
            findings.append(finding("error", "format", where, msg, "fix or remove the record (train stops on it)",
                                    "invalid-record"))
        kept, seen, too_few = unique_examples(examples, path)
        if repeated:
            lines = ", ".join(w.partition(": ")[0].rsplit(":", 1)[-1] for w in repeated[:LISTED])
            findings.append(finding("warning", "format", repeated[0].partition(": ")[0],
                                    f"{plural(len(repeated), 'record')} repeat an earlier record verbatim (lines "
                                    f"{lines}{', ...' if len(repeated) > LISTED else ''}); train drops the copies"
                                    + (f": {seen}" if training else ""),
                                    "remove the copies (a file of copies trains on far fewer examples than it seems)",
                                    "duplicate", count=len(repeated)))
        if training and too_few:
            findings.append(finding("error", "format", path, too_few.removeprefix(f"{path}: "),
                                    "add different examples (`collegeadvisor data validate FILE` says the same)",
                                    "too-few-unique", unique=len(kept), examples=len(examples)))
        return examples

    examples = load(cfg.data, training=True)
    everything = [dict(e, file=cfg.data) for e in examples]
    val = load(cfg.val_data) if cfg.val_data else None
    everything += [dict(e, file=cfg.val_data) for e in val or []]
    train_ex, val_ex, _ = train_val(examples, val, cfg.val_fraction, cfg.seed, cfg.max_examples)
    return {"train": (cfg.data, train_ex), "val": (cfg.val_data or cfg.data, val_ex)}, everything, findings


def _cut(row: dict, max_length: int) -> bool:
    return len(row["input_ids"]) > max_length and labelled_count({"labels": row["labels"][max_length:]}) > 0


def histogram(lengths: Sequence[int], max_length: int, bins: int = 8) -> list[tuple[str, int]]:
    step = max(1, math.ceil(max_length / bins))
    edges = list(range(0, max_length, step)) + [max_length]
    out = [(f"{lo + 1}-{hi}", sum(1 for x in lengths if lo < x <= hi)) for lo, hi in zip(edges, edges[1:])]
    out.append((f">{max_length}", sum(1 for x in lengths if x > max_length)))
    return out


def check_length(cfg, rows_by_split: dict[str, list[dict]], max_positions: int | None) -> list[Finding]:
    out = []
    ml = cfg.max_length
    if max_positions and ml > max_positions:
        out.append(finding("error", "length", "max_length", f"max_length {ml} exceeds the model's "
                           f"{max_positions} positions", f"set max_length to at most {max_positions}",
                           "beyond-positions"))
    for name, rows in rows_by_split.items():
        if not rows:
            continue
        lengths = [len(r["input_ids"]) for r in rows]
        rep = length_report(lengths, ml)
        # longer than the model itself: no max_length keeps them, so the truncation policy alone handles them
        beyond = [r for r in rows if max_positions and len(r["input_ids"]) > max_positions and _cut(r, ml)]
        cut = [r["where"] for r in rows if _cut(r, ml) and not (max_positions and len(r["input_ids"]) > max_positions)]
        share = len(cut) / len(rows)
        out.append(finding("info", "length", name, f"{rep['n']} examples, tokens min {rep['min']} / p50 "
                           f"{rep['p50']} / p99 {rep['p99']} / max {rep['max']}; max_length "
                           f"{rep['max_length_for_99pct']} covers 99%", code="histogram",
                           histogram=histogram(lengths, ml), report=rep))
        if name == "train" and beyond:
            out.append(_beyond_model(cfg, rows, beyond, max_positions))
        if name != "train":  # validation rows are cut (truncation: truncate); it only shifts the val loss
            if cut:
                out.append(finding("info", "length", name, f"{plural(len(cut), name + ' answer')} cut at max_length "
                                   f"{ml} (validation loss only)", code="val-cut"))
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
        out.append(finding(level, "length", "max_length", msg, fix, "answers-cut", share=share, wheres=cut))
    return out


def _beyond_model(cfg, rows: Sequence[dict], beyond: Sequence[dict], max_positions: int) -> Finding:
    """Training examples longer than the model's positions: the truncation policy says what happens to them (drop:
    dropped and counted, a warning, not a stop; error: a stop)."""
    what = {"drop": "dropped from training and counted", "truncate": "cut mid-answer",
            "error": "a stop: train refuses the first one"}[cfg.truncation]
    longest = max(beyond, key=lambda r: len(r["input_ids"]))
    msg = (f"{plural(len(beyond), 'training example')} of {len(rows)} longer than the model's {max_positions} "
           f"positions ({len(longest['input_ids']):,} tokens at {longest['where']}): {what}")
    return finding("error" if cfg.truncation == "error" else "warning", "length", beyond[0]["where"], msg,
                   "shorten or remove those examples", "beyond-model", wheres=[r["where"] for r in beyond])


def _round_up(n: int, to: int = 64) -> int:
    return -(-n // to) * to


def check_label_share(rows_by_split: dict[str, list[dict]]) -> list[Finding]:
    out = []
    for name, rows in rows_by_split.items():
        total = sum(len(r["input_ids"]) for r in rows)
        if not total:
            continue
        labelled = sum(labelled_count(r) for r in rows)
        out.append(finding("info", "masking", name, f"{labelled / total:.1%} of {total} tokens carry labels "
                           "(assistant replies and their end-of-turn tokens)", code="label-share",
                           share=labelled / total))
    return out

