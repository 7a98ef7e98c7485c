"""Generation for every stage (training samples, eval, chat, serve): prompts come from chat_format only.

Batched greedy or sampled generation uses left padding and the KV cache and stops at the template's end-of-turn
token. A conversation answered from retrieved rows is rendered with them (`chat_format.with_context`) and decoded
under `GroundedDecoding`: a figure, yes/no or "no data" that its cited row contradicts can't be written (the
rules are `grounding.Rules`). `answer` adds the check: a reply that fails it is generated again with the offending
claim forbidden, at most twice, and otherwise replaced by the cited row's own facts. `stream_batch` is the one
streaming path: several replies in one batch, each row's text to its own callback as it comes.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Callable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from collegeadvisor import grounding
from collegeadvisor.chat_format import encode_prompt, stop_token_ids, with_context
from collegeadvisor.config import MAX_NEW_TOKENS

RETRIES = 2  # generations after a failed check, before answering with the row itself
SLOT_STARTS = set("0123456789$-\u2212")  # how a value in a field's slot may begin (else "no data")


def gen_kwargs(tokenizer, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> dict:
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
              pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kw


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt right-aligned: new tokens follow each prompt directly."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------ the constraint
@lru_cache(maxsize=8)
def _token_texts(tokenizer) -> dict[str, list[int]]:
    """Every token's text (as it reads after other text: SentencePiece's word-start marker "▁" as a space) -> the
    ids that spell it."""
    out: dict[str, list[int]] = {}
    # by id: a fast tokenizer's get_vocab() comes in another order in each process, and the first text of a token
    # class stands for the class (`_token_classes`), so an unsorted vocabulary could decode differently per process
    for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("\u2581") and not text.startswith(" "):  # SentencePiece's word-start marker
            text = " " + text
        out.setdefault(text, []).append(i)
    return out


@lru_cache(maxsize=8)
def _token_classes(tokenizer) -> dict[str, list[tuple[tuple, tuple[list[int], str]]]]:
    """The tokens the grounding rules can object to, grouped by what the rules see of them
    (`grounding.signature` -> (ids, a representative text)): those with "[" (a citation), those with a digit, "$"
    or "%" (a figure), those that go on a figure ("," "."), and yes/no and the words that start a "no data"; and,
    one text a group, those that may follow an open "[" (a digit or "]" first: any other token, a letter above all,
    would write no citation)."""
    groups: dict[str, dict[tuple, tuple[list[int], str]]] = {"bracket": {}, "figure": {}, "cont": {}, "word": {},
                                                              "after_open": {}}
    words = set(grounding.YES_NO) | grounding.NO_WORDS | set(grounding.TEST_WORDS)
    for text, ids in _token_texts(tokenizer).items():
        if text[:1].isdigit() or text[:1] == "]":
            groups["after_open"][("text", text)] = (list(ids), text)
        if "[" in text:
            kind = "bracket"
        elif any(c.isdigit() or c in "$%" for c in text) or text.strip() in ("-", "\u2212"):
            kind = "figure"
        elif text[:1] in (",", "."):
            kind = "cont"
        elif text.strip().lower() in words:
            kind = "word"
        else:
            continue
        groups[kind].setdefault(grounding.signature(text), ([], text))[0].extend(ids)
    return {kind: list(found.items()) for kind, found in groups.items()}


@lru_cache(maxsize=8)
def _openers(tokenizer) -> dict[str, list[int]]:
    """The tokens that begin each way a comparison's winner sentence opens ("The", "Graduates of"): " The", "T", ...
    (a scan of the vocabulary: once per tokenizer, not once per reply: 33 ms each for SmolLM2's)."""
    return {o: [i for text, ids in _token_texts(tokenizer).items() if text.strip() and text == text.rstrip()
                and o.startswith(text.strip()) for i in ids] for o in grounding.WINNER_OPENING.values()}


class GroundedDecoding(LogitsProcessor):
    """Masks, for each row with passages, every token that `grounding.Rules` would not admit after the text so far.
    Inside a figure only its valid continuations remain (and the figure may end only where it is complete); inside a
    "[" only a citable index and "]"; right after a citation only tokens that go on spelling the cited row's name."""

    def __init__(self, tokenizer, rules: Sequence[grounding.Rules | None], prompt_width: int):
        self.tokenizer, self.rules, self.width = tokenizer, list(rules), prompt_width
        self.classes = _token_classes(tokenizer)
        self.texts = _token_texts(tokenizer)
        self.longest = max(map(len, self.texts), default=0)
        self.stops = set(stop_token_ids(tokenizer))
        self.cache: dict = {}
        self.openers = _openers(tokenizer)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, rules in enumerate(self.rules):
            if rules is None:
                continue
            new = input_ids[row, self.width:].tolist()
            if self.stops.intersection(new):
                continue
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            self._mask(rules, text, scores[row])
        return scores

    def _mask(self, rules: grounding.Rules, text: str, row_scores: torch.Tensor) -> None:
        key = rules.decision_key(text)
        decided = self.cache.get(key) if key is not None else None
        if decided is None:
            decided = self._decide(rules, text)
            if key is not None:
                self.cache[key] = decided
        banned, keep = decided
        if keep is not None:
            if torch.isfinite(row_scores[keep]).any():
                allowed = torch.zeros_like(row_scores, dtype=torch.bool)
                allowed[keep] = True
                row_scores.masked_fill_(~allowed, float("-inf"))
        elif banned:
            row_scores[banned] = float("-inf")

    def spelling(self, rests: Sequence[str]) -> list[int]:
        """The ids of tokens whose text begins one of `rests` (rests[:j] for some j >= 1): a lookup per prefix, no
        scan of the vocabulary."""
        return sorted({i for rest in rests for j in range(1, min(len(rest), self.longest) + 1)
                       for i in self.texts.get(rest[:j], ())})

    def _decide(self, rules: grounding.Rules, text: str) -> tuple[list[int], list[int] | None]:
        """(banned ids, or the only ids kept: in a name after a citation, inside a "[", inside a figure that can't
        end yet). Tokens that the rules can't tell apart (same `grounding.signature`) are asked about once. Where no
        token spells the name on (a character no token has alone), the name does not constrain that step."""
        rests = rules.name_slot(text)
        keep = self.spelling(rests) if rests is not None else []
        if keep:
            return [], keep
        if rules.open_citation(text) is not None:
            keep = [i for _, (ids, piece) in self.classes["after_open"] if rules.admits(text, piece) for i in ids]
            if keep:
                return [], keep
        if rules.value_slot(text):  # after a field's label: only the row's value, or "no data" where it has none
            signed = any(a[:1] in "-\u2212" for a in rules.allowed(text))  # a "-" only before a negative value
            keep = [i for _, (ids, piece) in self.classes["figure"] + self.classes["word"]
                    if (piece.strip().lower() in grounding.NO_WORDS or piece.strip()[:1] in SLOT_STARTS)
                    and (signed or piece.strip()[:1] not in "-\u2212") and rules.admits(text, piece) for i in ids]
            if keep and text.endswith(":"):
                keep += self.texts.get(" ", [])  # the space after the colon, as the dataset writes it
            if keep:
                return [], keep
        open_figure = rules.open_figure(text)
        groups = self.classes["figure"] + self.classes["word"] + self.classes["bracket"]
        if open_figure is not None:
            groups = groups + self.classes["cont"]
        admitted = {sig: rules.admits(text, ids_piece[1]) for sig, ids_piece in groups}
        if open_figure is not None and not rules.complete(open_figure.group(), text[:open_figure.start()]):
            keep = [i for sig, (ids, _) in groups if admitted[sig] for i in ids]
            return [], keep or [groups[0][1][0][0]]
        refused = [i for o in rules.refused_openings(text) for i in self.openers[o]]
        return [i for sig, (ids, _) in groups if not admitted[sig] for i in ids] + refused, None


def _processors(tokenizer, passages, width: int, forbid=None, expected=None) -> LogitsProcessorList:
    """The constraint for rows answered from retrieved passages (an empty list: retrieval found none, so no figure
    at all); rows with passages None decode freely. expected[i]: the rows conversation i asks about (or None)."""
    if not passages or all(p is None for p in passages):
        return LogitsProcessorList()
    forbid = forbid or [None] * len(passages)
    expected = expected or [None] * len(passages)
    rules = [grounding.Rules(p, f, e) if p is not None else None for p, f, e in zip(passages, forbid, expected)]
    return LogitsProcessorList([GroundedDecoding(tokenizer, rules, width)])


def cut_at_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in text begins (the earliest of them, as OpenAI's `stop`), or None."""
    found = [text.index(s) for s in stops if s and s in text]
    return min(found) if found else None


def _finish(tokenizer, new_ids: list[int], stops: list[int], stop_strings: Sequence[str] = (),
            rules: grounding.Rules | None = None) -> dict:
    """The reply's text, cut at the end-of-turn token or a stop string. A grounded reply that ran out of tokens in
    the middle of a figure ("$34,0") loses that partial figure: it is no figure of any row; one that ran out in a
    citation or the row's name after it ("[1] Bachelor's Deg") loses that citation."""
    stopped = False
    for i, t in enumerate(new_ids):
        if t in stops:
            new_ids, stopped = new_ids[:i], True
            break
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cut = cut_at_stop(text, stop_strings)
    if cut is not None:
        text, stopped = text[:cut], True
    partial = rules.open_figure(text) if rules is not None and not stopped else None
    if partial is not None and not rules.complete(partial.group(), text[:partial.start()]):
        text = text[:partial.start()]
    cut = rules.unfinished(text) if rules is not None and not stopped else None
    if cut is not None:
        text = text[:cut]
    return {"text": text.strip(), "ids": new_ids, "stopped": stopped, "n_tokens": len(new_ids)}


def is_engine(model) -> bool:
    """Whether `model` is an engine of its own (llamacpp.LlamaCpp, remote.RemoteEngine: `complete` for one prompt,
    and `complete_many` where it decodes several greedy replies at once) rather than a transformers model."""
    return callable(getattr(model, "complete", None))


def _complete(engine, tokenizer, prompts: Sequence[list[int]], passages, forbid, expected, grounded: bool,
              max_new_tokens: int, temperature: float, top_p: float, stop: Sequence[str] = (), on_tokens=None,
              cancels=None) -> list[dict]:
    """Replies from an engine, under the same constraint and cuts as `generate`'s batches: greedy ones side by side
    where the engine decodes several at once (`complete_many`), else one after another."""
    constraints = []
    for i, ids in enumerate(prompts):
        procs = _processors(tokenizer, [passages[i]], len(ids), [forbid[i]], [expected[i]]) if grounded else []
        constraints.append(procs[0] if procs else None)
    stops = stop_token_ids(tokenizer)
    on_tokens, cancels = on_tokens or [None] * len(prompts), cancels or [None] * len(prompts)
    if not temperature and hasattr(engine, "complete_many"):
        new = engine.complete_many(prompts, max_new_tokens, constraints, stops, on_tokens, cancels)
    else:
        new = [engine.complete(ids, max_new_tokens, temperature, top_p, c, stops, t, e)
               for ids, c, t, e in zip(prompts, constraints, on_tokens, cancels)]
    return [_finish(tokenizer, ids, stops, stop, c.rules[0] if c is not None else None)
            for ids, c in zip(new, constraints)]


@torch.inference_mode()
def generate(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = MAX_NEW_TOKENS,
             temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16, stop: Sequence[str] = (),
             passages: Sequence[Sequence[str] | None] | None = None, forbid: Sequence[dict | None] | None = None,
             grounded: bool = True, expected: Sequence[Sequence[int] | None] | None = None) -> list[dict]:
    """Replies for many conversations: [{'text', 'ids', 'stopped' (ended at end-of-turn), 'n_tokens'}].

    passages[i]: the rows conversation i is answered from; they are rendered into its prompt and, with `grounded`,
    constrain its decoding (forbid[i]: what a failed check found; expected[i]: the rows (1-based) the question
    resolved to, the only Scorecard rows it may cite)."""
    passages = list(passages) if passages is not None else [None] * len(conversations)
    forbid = list(forbid) if forbid is not None else [None] * len(conversations)
    expected = list(expected) if expected is not None else [None] * len(conversations)
    prompts = [encode_prompt(tokenizer, with_context(c, p or [])) for c, p in zip(conversations, passages)]
    if is_engine(model):
        return _complete(model, tokenizer, prompts, passages, forbid, expected, grounded, max_new_tokens, temperature,
                         top_p, stop)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict] = [{} for _ in prompts]
    stops = stop_token_ids(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
            width = ids.shape[1]
            procs = _processors(tokenizer, [passages[i] for i in idx], width, [forbid[i] for i in idx],
                                [expected[i] for i in idx]) if grounded else LogitsProcessorList()
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), logits_processor=procs,
                                 **gen_kwargs(tokenizer, max_new_tokens, temperature, top_p))
            rules = procs[0].rules if procs else [None] * len(idx)
            for row, i in enumerate(idx):
                out[i] = _finish(tokenizer, gen[row, width:].tolist(), stops, stop, rules[row])
    finally:
        model.train(was_training)
    return out


def answer(model, tokenizer, conversations: Sequence[Sequence[dict]], passages: Sequence[Sequence[str] | None],
           max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 16,
           stop: Sequence[str] = (), grounded: bool = True, retries: int = RETRIES,
           expected: Sequence[Sequence[int] | None] | None = None) -> list[dict]:
    """Replies checked against their rows: generate's fields plus 'grounding' (the check's verdict, with
    'attempts' and 'fallback'), 'raw' (the first reply's text) and 'raw_grounding' (its verdict). A reply whose
    check fails is generated again with the offending claims forbidden, at most `retries` times; then the answer is
    the row's own facts (a cited row asked about where there is one), said to be that. expected[i]: the rows
    (1-based) conversation i's question resolved to: the reply must cite them and no other Scorecard row."""
    expected = list(expected) if expected is not None else [None] * len(conversations)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size, stop=stop,
              grounded=grounded)
    out = generate(model, tokenizer, conversations, passages=passages, expected=expected, **kw)
    forbid: list[dict | None] = [None] * len(out)
    checked = lambda i, text: grounding.check(text, passages[i], expected[i])  # noqa: E731
    for i, r in enumerate(out):
        r["raw"] = r["text"]
        r["grounding"] = r["raw_grounding"] = checked(i, r["text"]) if passages[i] is not None else None
    for attempt in range(1, retries + 1):
        todo = [i for i, r in enumerate(out) if r["grounding"] and r["grounding"]["status"] == "unverified"]
        if not todo:
            break
        for i in todo:
            forbid[i] = grounding.forbidden(out[i]["grounding"], forbid[i])
        again = generate(model, tokenizer, [conversations[i] for i in todo], passages=[passages[i] for i in todo],
                         forbid=[forbid[i] for i in todo], expected=[expected[i] for i in todo], **kw)
        for i, r in zip(todo, again):
            out[i].update(r, grounding=checked(i, r["text"]) | {"attempts": attempt + 1})
    for i, r in enumerate(out):
        if r["grounding"] and r["grounding"]["status"] == "unverified":
            text = grounding.fallback_answer(passages[i], r["grounding"]["cited"], expected[i])
            r.update(text=text, grounding=checked(i, text) | {"fallback": True, "attempts": retries + 1})
    return out


# ------------------------------------------------------------------------------------------ streaming
class _Cancel(StoppingCriteria):
    """Ends a row's generation when its client went away or a stop string appeared in it."""

    def __init__(self, events: Sequence[threading.Event]):
        self.events = list(events)

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([e.is_set() for e in self.events], dtype=torch.bool, device=input_ids.device)


class _PieceStreamer:
    """One reply's token ids in, decoded text out as it becomes printable; ends at the first end-of-turn id."""

    def __init__(self, tokenizer, stops: Sequence[int], emit: Callable[[str], None]):
        self.tokenizer, self.stops, self.emit = tokenizer, set(stops), emit
        self.ids: list[int] = []
        self.stopped = False
        self._printed = 0

    def add(self, token: int) -> None:
        if self.stopped:
            return
        if token in self.stops:
            self.stopped = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.emit(text[self._printed:])
            self._printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self._printed:
            self.emit(text[self._printed:])
            self._printed = len(text)


class _RowsStreamer(BaseStreamer):
    """Receives each step's tokens of a batched `model.generate` and hands every row's token to that row's
    streamer; a row whose client went away, or whose text reached a stop string, takes no more."""

    def __init__(self, rows: Sequence[_PieceStreamer], cancels: Sequence[threading.Event]):
        self.rows, self.cancels = list(rows), list(cancels)
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first passes the prompts
            self._prompt_seen = True
            return
        for row, cancel, token in zip(self.rows, self.cancels, value.reshape(-1).tolist()):
            if not cancel.is_set():
                row.add(token)

    def end(self):
        for row in self.rows:
            row.end()


@torch.inference_mode()
def stream_batch(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int, temperature: float,
                 top_p: float, cancels: Sequence[threading.Event], emits: Sequence[Callable[[str], None]],
                 passages: Sequence[Sequence[str] | None] | None = None,
                 expected: Sequence[Sequence[int] | None] | None = None) -> list[dict]:
    """Several replies in one left-padded batch on the calling thread, each row's text pieces to its own `emit` as
    they come (under the same grounding constraint as `generate`, expected[i] as there); returns
    [{'stopped', 'n_tokens'}] per row. Greedy text equals `generate`'s."""
    passages = list(passages) if passages is not None else [None] * len(conversations)
    expected = list(expected) if expected is not None else [None] * len(conversations)
    prompts = [encode_prompt(tokenizer, with_context(c, p or [])) for c, p in zip(conversations, passages)]
    stops = stop_token_ids(tokenizer)
    rows = [_PieceStreamer(tokenizer, stops, emit) for emit in emits]
    if is_engine(model):  # each reply streamed as it comes
        _complete(model, tokenizer, prompts, passages, [None] * len(prompts), expected, True, max_new_tokens,
                  temperature, top_p, on_tokens=[row.add for row in rows], cancels=cancels)
        for row in rows:
            row.end()
        return _streamed(tokenizer, rows)
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), streamer=_RowsStreamer(rows, cancels),
                       stopping_criteria=StoppingCriteriaList([_Cancel(cancels)]),
                       logits_processor=_processors(tokenizer, passages, ids.shape[1], None, expected),
                       **gen_kwargs(tokenizer, max_new_tokens, temperature, top_p))
    finally:
        model.train(was_training)
    return _streamed(tokenizer, rows)


def _streamed(tokenizer, rows: Sequence[_PieceStreamer]) -> list[dict]:
    return [{"stopped": r.stopped, "n_tokens": len(r.ids), "text": tokenizer.decode(r.ids, skip_special_tokens=True)}
            for r in rows]
