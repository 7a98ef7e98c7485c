"""Batches: a seeded, length-grouped order per epoch (the same on every rank and after a resume), dynamic
padding, and the forward passes one optimizer step's examples run as (padded or packed)."""

from __future__ import annotations

import random
from typing import Sequence

import torch

from collegeadvisor.chat_format import IGNORE_INDEX


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Index batches for one epoch. With grouping, examples of similar length share a batch (less padding);
    batch order is still shuffled, so long and short batches interleave, except that the batch holding the longest
    example goes first (as transformers' LengthGroupedSampler does): a run meets its largest pass, and the memory
    that pass takes, at its first step rather than an hour in."""
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
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def blank(n: int, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels, zeros) of n rows of `width`: all padding, nothing labelled; the zeros are filled in as the
    attention mask (collate) or the position ids (collate_packed)."""
    shape = (n, width)
    return (torch.full(shape, pad_id, dtype=torch.long), torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            torch.zeros(shape, dtype=torch.long))


def padded(length: int, multiple: int | None) -> int:
    """A pass's width for its longest row: that length, rounded up to a multiple of `multiple` when one is set."""
    return -(-length // multiple) * multiple if multiple else length


def collate(rows: Sequence[dict], pad_id: int, multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (rounded up to a multiple of `multiple`); padded positions are masked by
    attention and labelled -100, so a pad id equal to EOS never removes EOS from the loss."""
    ids, labels, mask = blank(len(rows), padded(max(len(r["input_ids"]) for r in rows), multiple), pad_id)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        labels[i, :n] = torch.as_tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack_rows(rows: Sequence[dict], width: int) -> list[list[dict]]:
    """Examples into rows of at most `width` tokens: first fit, longest first (an example longer than width gets
    a row of its own)."""
    bins: list[list[dict]] = []
    room: list[int] = []
    for r in sorted(rows, key=lambda r: -len(r["input_ids"])):
        n = len(r["input_ids"])
        at = next((b for b, free in enumerate(room) if free >= n), None)
        if at is None:
            bins.append([])
            room.append(max(width, n))
            at = len(bins) - 1
        bins[at].append(r)
        room[at] -= n
    return bins


def collate_packed(bins: Sequence[Sequence[dict]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each bin's examples end to end in one row, `position_ids` restarting at 0 for each example and no
    attention mask: transformers then keeps attention inside each example, provided the forward runs with
    use_cache=False. Each example's first label is dropped, as the shift drops it unpacked, so no example is
    trained to predict its neighbour's first token."""
    longest = max(sum(len(r["input_ids"]) for r in b) for b in bins)
    ids, labels, positions = blank(len(bins), longest, pad_id)
    for i, b in enumerate(bins):
        at = 0
        for r in b:
            n = len(r["input_ids"])
            ids[i, at : at + n] = torch.as_tensor(r["input_ids"])
            labels[i, at + 1 : at + n] = torch.as_tensor(r["labels"][1:])
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(longest - at)  # the padding tail is one more "example", never trained
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def forward_batches(rows: Sequence[dict], pad_id: int, max_tokens: int, packing: bool = False,
                    width: int = 512, multiple: int | None = None) -> list[dict[str, torch.Tensor]]:
    """One optimizer step's examples as forward passes of at most `max_tokens` tokens each, padding included (a
    longer single example gets a pass of its own). The loss is a sum over labelled tokens divided by the step's
    label count, so the split changes the gradient only by rounding; it trades memory for fewer, larger matmuls.

    Unpacked: longest first, each pass right-padded to its longest example (rounded up to a multiple of
    `multiple`). Packed: rows of at most `width` tokens (pack_rows), max_tokens // width rows per pass."""
    if packing:
        bins = pack_rows(rows, width)
        per_pass = max(1, max_tokens // width)
        return [collate_packed(bins[i : i + per_pass], pad_id) for i in range(0, len(bins), per_pass)]
    passes: list[list[dict]] = []
    for r in sorted(rows, key=lambda r: -len(r["input_ids"])):
        if passes and (len(passes[-1]) + 1) * padded(len(passes[-1][0]["input_ids"]), multiple) <= max_tokens:
            passes[-1].append(r)
        else:
            passes.append([r])
    return [collate(p, pad_id, multiple) for p in passes]
