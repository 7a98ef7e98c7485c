"""Format and masking checks of each example, encoded as train encodes it (chat_format): it renders through the
model's own template; each generation prompt is an exact token prefix of the training ids; the end-of-turn token
ends each assistant turn and is labelled; no prompt token is labelled; no foreign scaffolding (`<|endoftext|>`,
`</s>`, `### Response:`, ...) inside the data."""

from __future__ import annotations

from typing import Sequence

from collegeadvisor.chat_format import IGNORE_INDEX, encode_conversation, encode_prompt, end_of_turn_token, render_text
from collegeadvisor.check.findings import Finding, finding, lines_of, plural
from collegeadvisor.data.prepare import control_token_hits, control_tokens, conversation, special_tokens
from collegeadvisor.errors import TemplateError

PROMPT_IN_ANSWER_MIN_CHARS = 20  # a user message this long found verbatim in the reply: the prompt is trained on

PROBE = [{"role": "system", "content": "Zq1"}, {"role": "user", "content": "Zq2"},
         {"role": "assistant", "content": "Zq3"}]
OWN_END = ("own-end-of-turn", "this model's own end-of-turn token (the reply would end there)")
OWN_SPECIAL = ("own-special-token", "a special token of this tokenizer (it becomes a control token, not text)")


def scaffold_text(tokenizer) -> str:
    """A probe conversation as the template renders it: the template's own markers around three short messages."""
    for probe in (PROBE, PROBE[1:]):  # templates without a system role refuse the first
        try:
            return render_text(tokenizer, probe)
        except TemplateError:
            continue
    return ""


def marker_kinds(tokenizer) -> dict[str, tuple[str, str]]:
    """marker -> (code, what it is) for this model: its own end-of-turn token, its own special tokens and role
    markers (which fake turns or stop the reply when written inside content), and other formats' scaffolding. The
    markers are data's rule (data.prepare.control_tokens: the known templates' control tokens, and this tokenizer's
    special tokens), the one `data validate` applies; here each is named for this model."""
    eot = end_of_turn_token(tokenizer)
    scaffold = scaffold_text(tokenizer)
    specials = special_tokens(tokenizer)
    kinds: dict[str, tuple[str, str]] = {}
    for marker, what in control_tokens(tokenizer).items():
        if marker == eot:
            kinds[marker] = OWN_END
        elif marker in specials:
            kinds[marker] = OWN_SPECIAL
        elif marker in scaffold:
            kinds[marker] = ("own-role-marker", "this template's own role marker (it fakes a turn)")
        else:
            kinds[marker] = ("foreign-scaffolding", f"{what}, foreign to this model's template, which ends turns "
                                                    f"with {eot}")
    return kinds


def check_scaffolding(tokenizer, examples: Sequence[dict]) -> list[Finding]:
    """Foreign or own chat-format markers written inside message content or retrieved context, with file:line
    (data.prepare.control_token_hits, as `data validate` finds them)."""
    kinds = marker_kinds(tokenizer)
    hits: dict[str, list[str]] = {}
    for where, marker in control_token_hits(examples, kinds):
        hits.setdefault(marker, []).append(where)
    out = []
    for marker, wheres in hits.items():
        code, what = kinds[marker]
        out.append(finding("error", "format", wheres[0], f"{marker!r} inside message content is {what} "
                           f"({plural(len(wheres), 'example')}; lines {lines_of(wheres)})",
                           f"remove {marker!r} from the data: write plain messages and let the model's own template "
                           "add its markers", code, marker=marker, count=len(wheres), wheres=wheres))
    return out


def example_findings(tokenizer, conv: Sequence[dict], ids: Sequence[int], labels: Sequence[int], where: str,
                     eot_id: int | None = None) -> list[Finding]:
    """Format and masking findings for one tokenized example, checked against its generation prompts: every prompt
    is an exact prefix of `ids`, no prompt token carries a label, every reply's tokens and its end-of-turn token do."""
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot_id is None else eot_id
    out: list[Finding] = []
    if len(ids) != len(labels):
        return [finding("error", "masking", where, f"{len(ids)} ids but {len(labels)} labels", "labels must align with "
                        "input_ids (chat_format.encode_conversation makes both)", "misaligned-labels")]
    if all(l == IGNORE_INDEX for l in labels):
        out.append(finding("error", "masking", where, "every label is -100: the example trains nothing",
                           "give it an assistant reply (or raise max_length if the reply was cut off)", "no-labels"))
    if any(l not in (IGNORE_INDEX, t) for t, l in zip(ids, labels)):
        out.append(finding("error", "masking", where, "labels differ from the input ids (shifted or foreign labels)",
                           "labels are the input ids at trained positions, -100 elsewhere; the loss shifts them",
                           "labels-not-ids"))
    turns = [i for i, m in enumerate(conv) if m["role"] == "assistant"]
    done = 0  # positions before this are checked
    for k, i in enumerate(turns, 1):
        prompt = encode_prompt(tokenizer, conv[:i])
        n = len(prompt)
        if list(ids[:n]) != list(prompt):
            out.append(finding("error", "format", where, f"the generation prompt of assistant turn {k} is not a "
                               "token prefix of the training ids: the model is trained on other tokens than it is "
                               "prompted with", "render training text and prompts through chat_format only",
                               "prompt-not-prefix"))
            return out
        stray = sum(1 for l in labels[done:n] if l != IGNORE_INDEX)
        if stray:
            out.append(finding("error", "masking", where, f"{stray} prompt tokens before assistant turn {k} carry "
                               "labels: loss on the instruction", "label assistant tokens only "
                               "(chat_format.encode_conversation)", "prompt-labelled"))
        end = len(ids) if i == len(conv) - 1 else len(encode_conversation(tokenizer, conv[: i + 1]).input_ids)
        eots = [j for j in range(n, min(end, len(ids))) if ids[j] == eot_id]
        if not eots:
            out.append(finding("error", "format", where, f"assistant turn {k} does not end with the end-of-turn token "
                               f"{eot!r} (cut at max_length, or rendered by hand)", "let the template end each reply",
                               "no-end-of-turn"))
            done = min(end, len(ids))
            continue
        e = eots[-1]
        if labels[e] != eot_id:
            out.append(finding("error", "format", where, f"the end-of-turn token {eot!r} that ends assistant turn {k} "
                               "carries no label: the model never learns to stop", "label the end-of-turn token "
                               "(chat_format does)", "end-of-turn-unlabelled"))
        unlabelled = sum(1 for l in labels[n:e] if l == IGNORE_INDEX)
        if unlabelled:
            out.append(finding("error", "masking", where, f"{unlabelled} reply tokens of assistant turn {k} carry no "
                               "label", "label every assistant token", "reply-masked"))
        done = e + 1
    tail = sum(1 for l in labels[done:] if l != IGNORE_INDEX)
    if tail:
        out.append(finding("error", "masking", where, f"{tail} tokens after the last reply carry labels",
                           "label assistant tokens only", "prompt-labelled"))
    return out


def prompt_in_answer(conv: Sequence[dict], where: str) -> list[Finding]:
    """A reply that repeats a whole user message (an Alpaca text blob pasted as the answer): the prompt is trained."""
    seen: list[str] = []
    for m in conv:
        if m["role"] == "user" and len(m["content"].strip()) >= PROMPT_IN_ANSWER_MIN_CHARS:
            seen.append(m["content"].strip())
        elif m["role"] == "assistant" and any(u in m["content"] for u in seen):
            return [finding("error", "masking", where, "the reply contains the whole user message: the prompt sits "
                            "inside the answer, so its tokens carry labels (no label masking)",
                            "put the question in the user message only and the answer alone in the assistant message",
                            "prompt-in-answer")]
    return []


def encode_split(tokenizer, path: str, examples: Sequence[dict], eot_id: int) -> tuple[list[dict], list[Finding]]:
    """Every example encoded as train encodes it (no cut yet) and checked; rows keep file:line and the example."""
    rows, findings = [], []
    for ex in examples:
        where = f"{path}:{ex.get('line')}"
        conv = conversation(ex)
        try:
            enc = encode_conversation(tokenizer, conv)
        except TemplateError as exc:
            findings.append(finding("error", "format", where, f"does not render through the model's template: {exc}",
                                    "fix the conversation (roles, order) or use a model whose template accepts it",
                                    "render-failed"))
            continue
        findings += example_findings(tokenizer, conv, enc.input_ids, enc.labels, where, eot_id)
        findings += prompt_in_answer(conv, where)
        rows.append({"where": where, "input_ids": enc.input_ids, "labels": enc.labels, "example": ex})
    return rows, findings

