"""The one place where conversations become tokens.

Every stage (train, sample generation, eval, chat, serve, export) renders through this module, from the
tokenizer's own chat template, which the run manifest stores beside the adapter. Nothing else in the
package formats a prompt.

How a conversation is split without `{% generation %}` markers: for each assistant turn i the template is
rendered twice, `messages[:i]` with the generation prompt and `messages[:i+1]` without; each rendering must
extend the one before it (else the template cannot be split into turns: an error, never a fallback). The text
between the two is the assistant's turn; it is trained up to and including the end-of-turn token, and whatever
the template puts after that token (ChatML's newline) is masked. Segments are tokenized one by one, so the
ids of a generation prompt are, by construction, an exact prefix of the ids of the training example.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

from collegeadvisor.errors import TemplateError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

CONTEXT_INSTRUCTION = (
    "You are a college-value advisor. Answer from these College Scorecard facts only. "
    "If they do not cover the question, or a value is suppressed, say that the data are not available."
)

Message = dict[str, str]


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    answer_cut: bool = False  # an assistant token lay beyond max_length

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def with_context(messages: Sequence[Message], passages: Sequence[str]) -> list[Message]:
    """Retrieved passages enter the conversation here and nowhere else: as a system turn before the rest."""
    if not passages:
        return [dict(m) for m in messages]
    facts = "\n".join(f"[{i}] {p.strip()}" for i, p in enumerate(passages, 1))
    text = f"{CONTEXT_INSTRUCTION}\n\n{facts}"
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{text}"
        return out
    return [{"role": "system", "content": text}, *out]


def _render(tokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the tokenizer of '{getattr(tokenizer, 'name_or_path', '?')}' has no chat template; "
            "use a chat/instruct model or set tokenizer.chat_template"
        )
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja2 errors, raise_exception() in templates
        raise TemplateError(f"the chat template failed to render this conversation: {exc}") from exc


def _special_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False))
    return sorted((s for s in specials if s), key=len, reverse=True)


@lru_cache(maxsize=32)
def end_of_turn_token(tokenizer) -> str:
    """The special token the template writes right after an assistant's reply (`</s>`, `<|im_end|>`...)."""
    probe = "Zq7 probe reply"
    msgs = [{"role": "user", "content": "Zq7 probe question"}, {"role": "assistant", "content": probe}]
    before = _render(tokenizer, msgs[:1], True)
    through = _render(tokenizer, msgs, False)
    if not through.startswith(before):
        raise TemplateError("the chat template renders the prompt differently once a reply follows; it cannot be split into turns")
    turn = through[len(before):]
    at = turn.find(probe)
    if at < 0:
        raise TemplateError("the chat template does not write the assistant's reply verbatim; it cannot be split into turns")
    after = turn[at + len(probe):].lstrip(" ")
    for special in _special_strings(tokenizer):
        if after.startswith(special):
            return special
    raise TemplateError(
        f"the chat template ends assistant turns with {after[:20]!r}, not with a special token of this tokenizer "
        f"(eos is {tokenizer.eos_token!r}); a model trained on it never learns to stop"
    )


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end generation: the end-of-turn token, then EOS if it differs."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise TemplateError("empty conversation")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i} needs a role in {ROLES} and a string content, got {m!r:.80}")


def segments(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces; adjacent pieces alternate trained/untrained."""
    _check_messages(messages)
    eot = end_of_turn_token(tokenizer)
    pieces: list[tuple[str, bool]] = []
    done = ""  # rendered text covered by pieces so far

    def extend(text: str, what: str) -> str:
        if not text.startswith(done):
            raise TemplateError(
                f"the chat template renders earlier turns differently once {what} follows; it cannot be split into turns"
            )
        return text[len(done):]

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if not any(p["role"] == "user" for p in messages[:i]):
            raise TemplateError(f"assistant message {i} comes before any user message")
        before = _render(tokenizer, messages[:i], True)
        pieces.append((extend(before, f"assistant turn {i}"), False))
        done = before
        through = _render(tokenizer, messages[: i + 1], False)
        turn = extend(through, f"the end of assistant turn {i}")
        cut = turn.rfind(eot)
        if cut < 0:
            raise TemplateError(f"assistant turn {i} does not end with the end-of-turn token {eot!r}")
        cut += len(eot)
        pieces += [(turn[:cut], True), (turn[cut:], False)]
        done = through
    full = _render(tokenizer, messages, add_generation_prompt)
    pieces.append((extend(full, "the last message"), False))
    merged: list[tuple[str, bool]] = []
    for text, trained in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


@lru_cache(maxsize=32)
def _bos_prefix(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer itself puts before text (TinyLlama's <s>); none for ChatML models."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    return tuple(with_special[:n]) if n > 0 and with_special[n:][: len(plain)] == plain else ()


@lru_cache(maxsize=32)
def _context_free(tokenizer) -> bool:
    """False for SentencePiece-style tokenizers that add a word-start marker to every separately encoded text."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head = enc("\n")
    return enc("\nAnswer")[len(head):] == enc("Answer")


def _encode_piece(tokenizer, text: str, previous: str) -> list[int]:
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if not previous:
        ids = enc(text)
        prefix = list(_bos_prefix(tokenizer))
        bos = tokenizer.bos_token
        return ids if (not prefix or (bos and text.startswith(bos))) else prefix + ids
    if _context_free(tokenizer):
        return enc(text)
    # Encode in the context of the previous piece's tail, so no spurious word-start marker appears.
    anchor = previous[-16:]
    head, both = enc(anchor), enc(anchor + text)
    return both[len(head):] if both[: len(head)] == head else enc(text)


def _encode_segments(tokenizer, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    previous = ""
    for text, trained in pieces:
        piece = _encode_piece(tokenizer, text, previous)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
        previous = text
    return ids, labels


def encode_conversation(tokenizer, messages: Sequence[Message], max_length: int | None = None) -> Encoded:
    """Training ids and labels: loss on assistant turns (end-of-turn token included), -100 elsewhere.

    Past max_length the ids are cut and `answer_cut` says whether an assistant token was lost; callers drop
    or count such examples, they never pass silently.
    """
    ids, labels = _encode_segments(tokenizer, segments(tokenizer, messages))
    if max_length is None or len(ids) <= max_length:
        return Encoded(ids, labels)
    cut = any(x != IGNORE_INDEX for x in labels[max_length:])
    return Encoded(ids[:max_length], labels[:max_length], answer_cut=cut)


def encode_prompt(tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of a generation prompt: the conversation so far plus the template's assistant header."""
    if messages and messages[-1]["role"] == "assistant":
        raise TemplateError("a generation prompt must not end with an assistant message")
    ids, _ = _encode_segments(tokenizer, segments(tokenizer, messages, add_generation_prompt=True))
    return ids


def render_text(tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as the exact text the ids above come from (for previews and exports)."""
    return "".join(text for text, _ in segments(tokenizer, messages, add_generation_prompt))


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def format_spec(tokenizer) -> dict[str, Any]:
    """What the run manifest records so every later stage renders exactly as training did."""
    eot = end_of_turn_token(tokenizer)

    def tok(name: str) -> dict[str, Any]:
        t = getattr(tokenizer, name, None)
        return {"token": t, "id": tokenizer.convert_tokens_to_ids(t) if t is not None else None}

    return {
        "chat_template": tokenizer.chat_template,
        "template_sha256": template_hash(tokenizer.chat_template),
        "bos": tok("bos_token"),
        "eos": tok("eos_token"),
        "pad": tok("pad_token"),
        "unk": tok("unk_token"),
        "end_of_turn": {"token": eot, "id": tokenizer.convert_tokens_to_ids(eot)},
        "stop_token_ids": stop_token_ids(tokenizer),
        "bos_prefix_ids": list(_bos_prefix(tokenizer)),
    }
