"""`collegeadvisor data preview`: examples as the model trains on them, token by token, coloured by label.

Green tokens are trained (they carry a label), grey ones are masked (-100: system, user, template scaffolding),
the labelled end-of-turn token is marked on its own (that is what teaches the model to stop), and tokens past
max_length are struck through (train drops or cuts those examples). In the terminal (rich) and as a
self-contained HTML page.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Sequence

from collegeadvisor.chat_format import encode_conversation, end_of_turn_token
from collegeadvisor.config import Config
from collegeadvisor.data.loaders import load_examples
from collegeadvisor.data.prepare import conversation
from collegeadvisor.errors import AdvisorError
from collegeadvisor.fsutil import atomic_write_text
from collegeadvisor.models import load_tokenizer, resolve_base_model

KINDS = {  # kind -> (terminal style, HTML colour, legend, marks around a run of it in plain (uncoloured) output)
    "trained": ("black on green", "#b7f0b1", "trained (carries a label)", ("«", "»")),
    "masked": ("grey50", "#eeeeee", "masked (-100: prompt, system, scaffolding)", ("", "")),
    "eot": ("bold white on magenta", "#d070e0", "end-of-turn token, labelled (teaches the model to stop)", ("⟪", "⟫")),
    "eot-masked": ("bold white on red", "#ff8080", "end-of-turn token WITHOUT a label", ("⟨!", "!⟩")),
    "cut": ("strike red", "#ffd0d0", "past max_length (dropped or cut by train)", ("~~", "~~")),
}


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's text as it appears in the decoded sequence (a leading space stays with its token)."""
    out = []
    for i in range(len(ids)):
        lo = max(0, i - 8)
        before = tokenizer.decode(ids[lo:i], skip_special_tokens=False) if i > lo else ""
        both = tokenizer.decode(ids[lo : i + 1], skip_special_tokens=False)
        piece = both[len(before):] if both.startswith(before) else tokenizer.decode([ids[i]], skip_special_tokens=False)
        out.append(piece)
    return out


def classify(ids: Sequence[int], labels: Sequence[int], eot_id: int, max_length: int | None = None) -> list[str]:
    kinds = []
    for pos, (t, l) in enumerate(zip(ids, labels)):
        if max_length is not None and pos >= max_length:
            kinds.append("cut")
        elif t == eot_id:
            kinds.append("eot" if l != -100 else ("eot-masked" if _ends_reply(labels, pos) else "masked"))
        else:
            kinds.append("trained" if l != -100 else "masked")
    return kinds


def _ends_reply(labels: Sequence[int], pos: int) -> bool:
    """An unlabelled end-of-turn token right after labelled reply tokens: the stop the model should learn."""
    return pos > 0 and labels[pos - 1] != -100


def preview_examples(cfg, n: int = 3) -> list[dict]:
    """The first n valid examples of cfg.data as token pieces: [{where, tokens: [(text, kind, id, label)], ...}]."""
    if not cfg.data:
        raise AdvisorError("setting 'data': nothing to preview (--data FILE)")
    tokenizer = load_tokenizer(resolve_base_model(cfg.base_model))
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    examples, _ = load_examples(cfg.data, strict=False)
    out = []
    for ex in examples[:n]:
        enc = encode_conversation(tokenizer, conversation(ex))
        kinds = classify(enc.input_ids, enc.labels, eot_id, cfg.max_length)
        texts = token_texts(tokenizer, enc.input_ids)
        out.append({
            "where": f"{cfg.data}:{ex['line']}",
            "tokens": list(zip(texts, kinds, enc.input_ids, enc.labels)),
            "n_tokens": len(enc.input_ids),
            "n_trained": enc.n_trained,
            "end_of_turn": eot,
            "max_length": cfg.max_length,
        })
    return out


def _summary(ex: dict) -> str:
    n, t = ex["n_tokens"], ex["n_trained"]
    cut = sum(1 for _, k, _, _ in ex["tokens"] if k == "cut")
    eots = sum(1 for _, k, _, _ in ex["tokens"] if k == "eot")
    extra = f", {cut} past max_length {ex['max_length']}" if cut else ""
    return (f"{ex['where']}: {n} tokens, {t} trained ({t / max(n, 1):.0%}), {eots} labelled end-of-turn "
            f"{ex['end_of_turn']}{extra}")


def print_preview(examples: Sequence[dict], file=None) -> None:
    # rich (~12 ms): kept off the CLI's start, loaded when a preview prints
    from rich.console import Console
    from rich.text import Text

    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)
    plain = console.color_system is None  # a pipe or a log file: mark runs of tokens instead of colouring them
    legend = Text("legend: ")
    for style, _, label, (open_, close) in KINDS.values():
        legend.append(f"{open_}{label}{close}" if plain else f" {label} ", style=style)
        legend.append("  ")
    console.print(legend)
    for ex in examples:
        console.print(Text(f"\n── {_summary(ex)}", style="bold"))
        body = Text()
        for kind, text in runs(ex["tokens"]):
            open_, close = KINDS[kind][3] if plain else ("", "")
            body.append(f"{open_}{text.replace(chr(10), '↵' + chr(10))}{close}", style=KINDS[kind][0])
        console.print(body)


def runs(tokens: Sequence[tuple]) -> list[tuple[str, str]]:
    """Adjacent tokens of one kind joined: [(kind, text)]."""
    out: list[tuple[str, str]] = []
    for text, kind, _, _ in tokens:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def render_html(examples: Sequence[dict], title: str = "collegeadvisor data preview") -> str:
    css = "\n".join(f".{k} {{ background: {v[1]}; }}" for k, v in KINDS.items())
    legend = " ".join(f'<span class="tok {k}">{html.escape(v[2])}</span>' for k, v in KINDS.items())
    parts = []
    for ex in examples:
        spans = []
        for text, kind, tid, label in ex["tokens"]:
            tip = f"id {tid} · label {label} · {kind}"
            shown = html.escape(text).replace("\n", "↵\n")
            spans.append(f'<span class="tok {kind}" title="{html.escape(tip)}">{shown}</span>')
        parts.append(f"<h2>{html.escape(_summary(ex))}</h2>\n<pre>{''.join(spans)}</pre>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
pre {{ white-space: pre-wrap; word-break: break-word; font-size: 14px; line-height: 1.7; }}
.tok {{ border-radius: 3px; padding: 1px 0; margin-right: 1px; }}
.cut {{ text-decoration: line-through; }}
.masked {{ color: #666; }}
h2 {{ font-size: 15px; margin-top: 2em; }}
{css}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{legend}</p>
<p>Hover a token for its id and label.</p>
{chr(10).join(parts)}
</body></html>
"""


def cmd_preview(args) -> int:
    cfg = Config.from_args(args)
    examples = preview_examples(cfg, args.n)
    print_preview(examples)
    if args.html:
        path = atomic_write_text(Path(args.html), render_html(examples))
        print(f"\nHTML: {path}")
    else:
        print("\n(--html FILE writes this preview as a web page)")
    return 0


def register(data_subparsers) -> None:
    """Add `data preview` (the same settings as train: base model, data, max length...)."""
    p = data_subparsers.add_parser("preview", help="show examples token by token, coloured by label (trained, "
                                   "masked, end-of-turn)")
    Config.add_arguments(p)
    p.add_argument("--n", type=int, default=3, help="examples to show [default: 3]")
    p.add_argument("--html", default=None, metavar="FILE", help="also write the preview as an HTML page")
    p.set_defaults(func=cmd_preview)
