"""Generation for every stage (training samples, eval, chat, serve): prompts come from chat_format only.

Batched greedy generation uses left padding and the KV cache and stops at the template's end-of-turn token.
"""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

import torch

from collegeadvisor.chat_format import encode_prompt, stop_token_ids


def _gen_kwargs(tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    kw = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def _finish(tokenizer, new_ids: list[int], stops: list[int], stop_strings: Sequence[str] = ()) -> dict:
    stopped = False
    for i, t in enumerate(new_ids):
        if t in stops:
            new_ids, stopped = new_ids[:i], True
            break
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    for s in stop_strings:
        if s and s in text:
            text, stopped = text[: text.index(s)], True
    return {"text": text.strip(), "ids": new_ids, "stopped": stopped, "n_tokens": len(new_ids)}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt right-aligned: new tokens follow each prompt directly."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def generate(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, stop: Sequence[str] = ()) -> list[dict]:
    """Replies for many conversations: [{'text', 'ids', 'stopped' (ended at end-of-turn), 'n_tokens'}]."""
    prompts = [encode_prompt(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict] = [{} for _ in prompts]
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], pad)
            width = ids.shape[1]
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 **_gen_kwargs(tokenizer, max_new_tokens, temperature, top_p))
            for row, i in enumerate(idx):
                out[i] = _finish(tokenizer, gen[row, width:].tolist(), stops, stop)
    finally:
        model.train(was_training)
    return out


def stream(model, tokenizer, messages: Sequence[dict], max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0) -> Iterator[str]:
    """Text pieces of one reply as they are generated (a background thread runs generate)."""
    from transformers import TextIteratorStreamer

    prompt = torch.tensor([encode_prompt(tokenizer, messages)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), streamer=streamer,
                  **_gen_kwargs(tokenizer, max_new_tokens, temperature, top_p))
    errors: list[BaseException] = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as exc:  # surfaced to the consumer below
            errors.append(exc)
            streamer.end()

    model.eval()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
