"""`collegeadvisor export`: a run as merged safetensors, a GGUF file, or an Ollama Modelfile.

merged: PEFT's merge_and_unload, saved with the tokenizer carrying the run's chat template.
gguf:   written with the `gguf` package's GGUFWriter for Llama-architecture models (SmolLM2, TinyLlama): tensor
        names from gguf's TensorNameMap, Q/K rows permuted as llama.cpp expects, tokenizer, special ids and the
        chat template as metadata; f32, f16 or q8_0 (gguf.quants).
ollama: the GGUF plus a Modelfile whose TEMPLATE is cut from chat_format's own rendering of sentinel
        conversations, so Ollama writes the same prompt text the model was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from collegeadvisor.chat_format import format_spec, render_text, stop_token_ids
from collegeadvisor.errors import AdvisorError, ModelError, TemplateError
from collegeadvisor.fsutil import atomic_replace_dir, atomic_write_json, atomic_write_text, staging_dir

GGUF_TYPES = ("f32", "f16", "q8_0")
TARGETS = ("merged", "gguf", "ollama")
ROLES = ("system", "user", "assistant")
# byte-level BPE pre-tokenizers (tokenizer.json "pre_tokenizer") -> llama.cpp's name for the same split
BYTE_LEVEL_PRE = {
    json.dumps({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}): "gpt2",
    json.dumps({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}): "smollm",
}


# ------------------------------------------------------------------------------------------ merged
def merged_model(run_dir: str | Path, device: str = "cpu"):
    """(plain transformers model with the adapter merged in, tokenizer with the run's template, manifest)."""
    from collegeadvisor.runs import load_run

    model, tok, manifest = load_run(run_dir, device=device)
    merged = model.merge_and_unload()
    merged.generation_config.eos_token_id = stop_token_ids(tok)  # plain `generate` stops at end of turn
    merged.generation_config.pad_token_id = tok.pad_token_id
    return merged, tok, manifest


def _provenance(run_dir, manifest: dict, kind: str, **more) -> dict:
    return {"kind": kind, "run": str(Path(run_dir).resolve()), "base_model": manifest["base_model"]["spec"],
            "template_sha256": manifest["format"]["template_sha256"], **more}


def export_merged(run_dir: str | Path, out: str | Path, device: str = "cpu") -> Path:
    """A folder that plain transformers (or vLLM) loads: merged safetensors, config, tokenizer, template."""
    model, tok, manifest = merged_model(run_dir, device)
    out = Path(out)
    stage = staging_dir(out)
    model.save_pretrained(stage)
    tok.save_pretrained(stage)
    atomic_write_json(stage / "collegeadvisor-export.json", _provenance(run_dir, manifest, "merged"))
    atomic_replace_dir(stage, out)
    return out


# ------------------------------------------------------------------------------------------ gguf
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K row order -> llama.cpp's interleaved order (as convert_hf_to_gguf.py does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab_metadata(tokenizer, vocab_size: int) -> dict:
    """tokenizer.ggml.* values for a byte-level BPE ('gpt2') or SentencePiece-style BPE ('llama') tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, decoder = spec["model"], spec.get("decoder") or {}
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export handles BPE tokenizers; this one is {model.get('type')}")
    decoders = decoder.get("decoders", [decoder])
    if decoder.get("type") == "ByteLevel":
        kind = "gpt2"
        pre = BYTE_LEVEL_PRE.get(json.dumps(spec.get("pre_tokenizer")))
        if pre is None:
            shape = json.dumps(spec.get("pre_tokenizer"))[:120]
            raise ModelError(f"GGUF export does not know this byte-level pre-tokenizer ({shape}); "
                             "convert the merged folder (--to merged) with llama.cpp's convert_hf_to_gguf.py")
    elif any(d.get("type") == "Metaspace" or (d.get("type") == "Replace" and "▁" in json.dumps(d)) for d in decoders):
        kind, pre = "llama", "default"
    else:
        raise ModelError(f"GGUF export handles byte-level and SentencePiece-style tokenizers; this one decodes with "
                         f"{decoder.get('type')}; convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    special_ids = set(tokenizer.all_special_ids)
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special_ids or (i in added and added[i].special):
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.USER_DEFINED)
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
        # SentencePiece merges by score: later (rarer) merges score lower
        scores.append(0.0 if types[-1] != gguf.TokenType.NORMAL else -float(i))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"kind": kind, "pre": pre, "tokens": tokens, "types": types, "scores": scores, "merges": merges,
            "add_space_prefix": kind == "llama" and '"prepend_scheme": "never"' not in json.dumps(spec)}


def write_gguf(model, tokenizer, path: str | Path, gguf_type: str = "q8_0", name: str = "collegeadvisor") -> Path:
    """A llama.cpp/Ollama GGUF file of a (merged) Llama-architecture model and its tokenizer."""
    import gguf
    import torch

    if gguf_type not in GGUF_TYPES:
        raise AdvisorError(f"--gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    cfg = model.config
    if cfg.model_type != "llama":
        raise ModelError(f"GGUF export supports Llama-architecture models (SmolLM2, TinyLlama), not "
                         f"'{cfg.model_type}'; convert the merged folder (--to merged) with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default",
                                                     "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    biased = getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)
    if rope.get("rope_type", "default") != "default" or biased:
        raise ModelError("GGUF export supports plain Llama models (default RoPE, no biases); convert the merged "
                         "folder with llama.cpp's convert_hf_to_gguf.py")
    vocab = _vocab_metadata(tokenizer, cfg.vocab_size)
    fmt = format_spec(tokenizer)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model(vocab["kind"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["kind"] == "llama":
        w.add_token_scores(vocab["scores"])
        w.add_add_space_prefix(vocab["add_space_prefix"])
    if vocab["merges"]:
        w.add_token_merges(vocab["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if fmt[key]["id"] is not None:
            add(fmt[key]["id"])
    w.add_eot_token_id(fmt["end_of_turn"]["id"])
    w.add_add_bos_token(bool(fmt["bos_prefix_ids"]))
    w.add_add_eos_token(False)
    w.add_chat_template(tokenizer.chat_template)

    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise ModelError(f"GGUF export: no GGUF name for tensor '{hf_name}'")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1 or gguf_type == "f32":  # norms stay f32, as llama.cpp keeps them
            w.add_tensor(gg_name, np.ascontiguousarray(data, dtype=np.float32))
        elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gg_name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gg_name, data.astype(np.float16))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
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


# ------------------------------------------------------------------------------------------ CLI
def cmd_export(args) -> int:
    from collegeadvisor.runs import find_run

    run = find_run(args.run, args.output_dir)
    out = Path(args.out) if args.out else run / "export" / args.to
    if args.to == "merged":
        done = export_merged(run, out, args.device)
    elif args.to == "gguf":
        done = export_gguf(run, out, args.gguf_type, args.device)
    else:
        done = export_ollama(run, out, args.gguf_type, args.device)
    print(f"{args.to}: {done}")
    if args.to == "ollama":
        print(f"import it with: ollama create collegeadvisor -f {done}")
    return 0


def register(sub) -> None:
    """Add the `export` subcommand to the CLI's subparsers."""
    p = sub.add_parser("export", help="write a run as merged safetensors, a GGUF file, or an Ollama Modelfile")
    p.add_argument("--run", default="latest", help="run directory, or 'latest' (newest complete run)")
    p.add_argument("--output-dir", default="runs", help="where 'latest' looks for runs")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/<to>)")
    p.add_argument("--gguf-type", default="q8_0", choices=GGUF_TYPES, help="GGUF weight type [default: q8_0]")
    p.add_argument("--device", default="cpu", help="where the merge runs [default: cpu]")
    p.set_defaults(func=cmd_export)
