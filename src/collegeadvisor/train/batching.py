"""Batches: a seeded, length-grouped order per epoch (the same on every rank and after a resume) and dynamic padding."""

from __future__ import annotations

import random
from typing import Sequence

import torch

from collegeadvisor.chat_format import IGNORE_INDEX


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Index batches for one epoch. With grouping, examples of similar length share a batch (less padding);
    batch order is still shuffled, so long and short batches interleave."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        chunk = batch_size * 32
        order = [i for c in range(0, len(order), chunk)
                 for i in sorted(order[c : c + chunk], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(rows: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row; padded positions are masked by attention and labelled -100, so a pad id equal
    to EOS never removes EOS from the loss."""
    width = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
