"""Exports: merged weights load in plain transformers and answer like base+adapter; GGUF files read back
with gguf and load in transformers' GGUF loader with the same tokens and text; the Ollama TEMPLATE renders
exactly what chat_format renders (SmolLM2's ChatML with its default system prompt, TinyLlama's Zephyr)."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from collegeadvisor.chat_format import encode_prompt, render_text
from collegeadvisor.errors import ModelError, TemplateError
from collegeadvisor.export import (
    export_merged, merged_model, modelfile, ollama_template, register, template_pieces, write_gguf,
)
from collegeadvisor.generate import generate

PROMPTS = [
    [{"role": "user", "content": "What do graduates of program 3 earn at school 3?"}],
    [{"role": "user", "content": "Is program 5 at school 5 worth it compared to high school?"}],
    [{"role": "system", "content": "You are a college advisor."},
     {"role": "user", "content": "What do graduates of program 9 earn at school 2?"},
     {"role": "assistant", "content": "Graduates earned a median of $30,111."},
     {"role": "user", "content": "And the median debt?"}],
]
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module", params=["tinyllama", "smollm2"])
def run(request, trained_run):
    return trained_run if request.param == "tinyllama" else request.getfixturevalue("smol_run")


def texts(model, tok, n=12):
    return [r["text"] for r in generate(model, tok, PROMPTS, max_new_tokens=n)]


# ------------------------------------------------------------------------------------------ the targets
def test_exporters_are_the_targets_config_names():
    """config.TARGETS (what --to accepts) and export.EXPORTERS (what writes and verifies each) name the same
    targets in the same order: config sits below export and cannot read the registry itself."""
    from collegeadvisor.config import TARGETS, ExportConfig
    from collegeadvisor.export import EXPORTERS, Exporter, check_modelfile, load_gguf, load_merged

    assert tuple(EXPORTERS) == TARGETS
    assert all(isinstance(e, Exporter) and callable(e.write) and callable(e.load) for e in EXPORTERS.values())
    assert (EXPORTERS["merged"].load, EXPORTERS["gguf"].load, EXPORTERS["ollama"].load) == (load_merged, load_gguf,
                                                                                            load_gguf)
    assert [e.check for e in EXPORTERS.values()] == [None, None, check_modelfile]
    assert typing_args(ExportConfig.model_fields["to"].annotation) == TARGETS
    with pytest.raises(Exception):  # frozen: a target is changed by its entry, not at run time
        EXPORTERS["merged"].hint = "x"


def typing_args(annotation) -> tuple:
    import typing

    literal = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_args(literal)


def test_export_writes_through_the_registry(tmp_path, monkeypatch, capsys):
    """`export --to X` calls EXPORTERS[X]'s writer with the run, the output folder and the settings, and prints its
    hint; verify_export refuses a target it has no entry for."""
    from collegeadvisor.errors import AdvisorError
    from collegeadvisor.export import EXPORTERS, Exporter, verify_export

    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text('{"status": "complete"}')
    calls = []

    def write(run_dir, out, s):
        calls.append((run_dir, out, s.gguf_type, s.device))
        return out / "model.bin"

    monkeypatch.setitem(EXPORTERS, "gguf", Exporter(write=write, load=None, hint="then: {done}"))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--run", str(run), "--to", "gguf", "--gguf-type", "f16"])
    assert args.func(args) == 0
    out = run / "export" / "gguf"
    assert calls == [(run, out, "f16", "cpu")]
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"gguf: {out / 'model.bin'}", f"then: {out / 'model.bin'}"]
    with pytest.raises(AdvisorError, match="--to onnx: choose one of merged, gguf, ollama"):
        verify_export(run, "onnx", out)


# ------------------------------------------------------------------------------------------ merged
def test_merged_loads_in_plain_transformers_and_answers_the_same(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from collegeadvisor.runs import load_run

    peft_model, tok, manifest = load_run(trained_run)
    out = export_merged(trained_run, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "collegeadvisor-export.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    plain_tok = AutoTokenizer.from_pretrained(out)
    assert plain_tok.chat_template == manifest["format"]["chat_template"]
    assert not any("lora" in k for k in model.state_dict())
    assert texts(model, plain_tok) == texts(peft_model, tok)
    # the adapter is in the weights: they differ from the base model's
    base = AutoModelForCausalLM.from_pretrained(manifest["base_model"]["path"]).state_dict()
    assert any(not torch.equal(base[k], v) for k, v in model.state_dict().items())
    # plain transformers `generate` stops at the end-of-turn token
    assert model.generation_config.eos_token_id == manifest["format"]["stop_token_ids"]


def test_verify_reads_the_export_back_and_catches_a_tampered_one(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from collegeadvisor.export import verify_export

    out = export_merged(trained_run, tmp_path / "merged")
    report = verify_export(trained_run, "merged", out, n=2, max_new_tokens=8)
    assert report == {"kind": "merged", "prompts": 2, "identical_text": 2}
    weights = load_file(out / "model.safetensors")  # an export whose weights are not the run's: refused
    for k in weights:
        weights[k] = torch.randn_like(weights[k]) if weights[k].dim() == 2 else weights[k]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="greedy text differs"):
        verify_export(trained_run, "merged", out, n=2, max_new_tokens=8)
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ModelError, match="chat template differs"):
        verify_export(trained_run, "merged", out, n=2, max_new_tokens=8)


# ------------------------------------------------------------------------------------------ gguf
def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return reader, meta


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


def test_gguf_f32_round_trips_exactly(smol_run, tmp_path):
    """SmolLM2's tokenizer (the embedded default's) through llama.cpp's converter and back into transformers."""
    model, tok, manifest = merged_model(smol_run)
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f32", name="advisor")
    reader, meta = read_gguf(path)
    fmt = manifest["format"]
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "advisor"
    assert meta["tokenizer.chat_template"] == fmt["chat_template"]
    assert meta["tokenizer.ggml.eos_token_id"] == fmt["eos"]["id"] and meta["tokenizer.ggml.bos_token_id"] == fmt["bos"]["id"]
    # llama.cpp stops at end of turn: SmolLM2's EOS is its end-of-turn token <|im_end|>
    assert meta.get("tokenizer.ggml.eot_token_id", meta["tokenizer.ggml.eos_token_id"]) == fmt["end_of_turn"]["id"]
    assert meta["tokenizer.ggml.add_bos_token"] == bool(fmt["bos_prefix_ids"])
    assert len(meta["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert meta["tokenizer.ggml.model"] == ("gpt2" if "im_start" in fmt["chat_template"] else "llama")
    n_layers = model.config.num_hidden_layers
    assert len(reader.tensors) == 2 + 9 * n_layers + (0 if model.config.tie_word_embeddings else 1)
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight"}

    loaded, gguf_tok = load_gguf(path)
    sd = loaded.state_dict()
    for name, tensor in model.state_dict().items():  # Q/K permutation undone by the loader: weights identical
        assert torch.equal(sd[name], tensor), name
    for conv in PROMPTS:  # the tokenizer read from the file encodes prompts as the run's does
        assert encode_prompt(gguf_tok, conv) == encode_prompt(tok, conv)
    assert texts(loaded, gguf_tok) == texts(model, tok)


@pytest.mark.parametrize("gguf_type,tolerance", [("f16", 2e-3), ("q8_0", 1e-2)])
def test_gguf_quantized_stays_close(smol_run, tmp_path, gguf_type, tolerance):
    model, tok, _ = merged_model(smol_run)
    path = write_gguf(model, tok, tmp_path / f"m-{gguf_type}.gguf", gguf_type)
    reader, meta = read_gguf(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    want = gguf_type.upper()
    assert kinds["blk.0.ffn_down.weight"] == want and kinds["token_embd.weight"] == want
    assert kinds["output_norm.weight"] == "F32"
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7}[gguf_type]
    loaded, _ = load_gguf(path)
    sd = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        scale = tensor.abs().max().item()
        assert (sd[name] - tensor).abs().max().item() <= tolerance * scale, name
    ids = torch.tensor([encode_prompt(tok, PROMPTS[0])])
    with torch.no_grad():
        a, b = model(ids).logits, loaded(ids).logits
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


def test_gguf_refuses_what_it_cannot_write(trained_run, tmp_path):
    """The test TinyLlama tokenizer is a tokenizer.json BPE with no SentencePiece model and no byte fallback, which
    llama.cpp's converter cannot map: one clear line, and nothing left in the output folder."""
    model, tok, _ = merged_model(trained_run)
    with pytest.raises(Exception, match="gguf-type"):
        write_gguf(model, tok, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(ModelError, match=r"converter failed for llama: .*pre-tokenizer") as err:
        write_gguf(model, tok, tmp_path / "x.gguf", "f16")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ ollama
ACTION = re.compile(r"\{\{(.*?)\}\}", re.S)


def go_render(template: str, data: dict) -> str:
    """A tiny evaluator of the Go text/template subset a Modelfile uses: range/if/else if/end, eq, .Field."""
    parts = ACTION.split(template)  # even indexes: literal text; odd: actions
    assert not any(p.startswith("-") or p.endswith("-") for p in parts[1::2]), "trim markers are not emitted"

    def parse(i):
        nodes = []
        while i < len(parts):
            if i % 2 == 0:
                nodes.append(("text", parts[i]))
                i += 1
                continue
            act = parts[i].strip()
            if act in ("end", "else") or act.startswith("else if "):
                return nodes, i
            if act.startswith("range "):
                body, i = parse(i + 1)
                assert parts[i].strip() == "end"
                nodes.append(("range", act[6:].strip(), body))
            elif act.startswith("if "):
                branches, cond = [], act[3:].strip()
                while True:
                    body, i = parse(i + 1)
                    branches.append((cond, body))
                    stop = parts[i].strip()
                    if stop == "end":
                        break
                    cond = stop[8:].strip() if stop.startswith("else if ") else "true"
                nodes.append(("if", branches))
            else:
                nodes.append(("var", act))
            i += 1
        return nodes, i

    def field(expr, ctx):
        assert expr.startswith("."), expr
        return ctx.get(expr[1:], "")

    def truth(cond, ctx):
        if cond == "true":
            return True
        m = re.fullmatch(r'eq (\.\w+) "([^"]*)"', cond)
        return field(m[1], ctx) == m[2] if m else bool(field(cond, ctx))

    def run(nodes, ctx):
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "var":
                out.append(str(field(node[1], ctx)))
            elif node[0] == "range":
                out += [run(node[2], item) for item in field(node[1], ctx)]
            else:
                out.append(next((run(body, ctx) for cond, body in node[1] if truth(cond, ctx)), ""))
        return "".join(out)

    tree, end = parse(0)
    assert end == len(parts)
    return run(tree, data)


def parse_modelfile(text: str) -> dict:
    out = {"stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)}
    for key in ("TEMPLATE", "SYSTEM"):
        m = re.search(rf'^{key} """(.*?)"""$', text, re.M | re.S)
        out[key] = m[1] if m else None
    out["FROM"] = re.search(r"^FROM (.+)$", text, re.M)[1]
    return out


def ollama_render(mf: dict, messages: list[dict]) -> str:
    """Ollama's chat path: SYSTEM becomes a first system message when the request has none."""
    if mf["SYSTEM"] is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": mf["SYSTEM"]}, *messages]
    return go_render(mf["TEMPLATE"], {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


CONVERSATIONS = PROMPTS + [
    [{"role": "user", "content": "Line one\nline two, with {braces} and <tags>"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


@pytest.mark.parametrize("name", ["smollm2", "tinyllama"])
def test_ollama_template_renders_like_chat_format(name, smol_tokenizer, tinyllama_tokenizer):
    tok = {"smollm2": smol_tokenizer, "tinyllama": tinyllama_tokenizer}[name]
    mf = parse_modelfile(modelfile(tok, "model-q8_0.gguf"))
    assert mf["FROM"] == "./model-q8_0.gguf"
    assert mf["SYSTEM"] == (SMOL_DEFAULT_SYSTEM if name == "smollm2" else None)
    assert mf["stop"] == (["<|im_end|>"] if name == "smollm2" else ["</s>"])
    for conv in CONVERSATIONS:
        assert ollama_render(mf, conv) == render_text(tok, conv, add_generation_prompt=True), conv
    assert go_render(ollama_template(template_pieces(tok)), {"Messages": []}) == template_pieces(tok)["generation"]


def test_ollama_refuses_templates_it_cannot_express(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    # system text folded into the first user turn (Llama-2 style): not one piece per message
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
                         "{% elif m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
                         "{% else %}<|im_start|>assistant\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError):
        modelfile(tok, "m.gguf")


def test_export_ollama_cli(smol_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--run", str(smol_run), "--to", "ollama", "--out", str(tmp_path / "ol"),
                              "--gguf-type", "f16", "--verify", "2"])
    assert args.func(args) == 0
    mf_path = tmp_path / "ol" / "Modelfile"
    printed = capsys.readouterr().out
    assert str(mf_path) in printed
    assert "Ollama TEMPLATE renders as chat_format" in printed
    assert re.search(r"identical to base \+ adapter on [0-2]/2 prompts", printed)
    mf = parse_modelfile(mf_path.read_text())
    gguf_file = (mf_path.parent / mf["FROM"]).resolve()
    assert gguf_file.is_file() and gguf_file.name == "model-f16.gguf"
    _, meta = read_gguf(gguf_file)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.chat_template"] == smol_run_template(smol_run)
    assert 'PARAMETER stop "<|im_end|>"' in mf_path.read_text()


def smol_run_template(run):
    import json

    return json.loads((run / "manifest.json").read_text())["format"]["chat_template"]


def test_chat_endpoints_drop_bos_for_tinyllama_templates_and_completions_keep_it(smol_tokenizer,
                                                                                 tinyllama_tokenizer):
    """What docs/serving.md says of vLLM: a chat endpoint tokenizes the rendered template without special tokens
    (as apply_chat_template(tokenize=True) does), which loses TinyLlama's <s>; the completions path (the rendered text
    tokenized with the tokenizer's defaults) keeps it, and equals the ids training used. ChatML loses nothing."""
    from collegeadvisor.chat_format import encode_prompt, render_text

    msgs = [{"role": "user", "content": "What do nurses earn at Test University?"}]
    for tok, loses_bos in ((tinyllama_tokenizer, True), (smol_tokenizer, False)):
        trained = encode_prompt(tok, msgs)
        chat = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
        completions = tok(render_text(tok, msgs, add_generation_prompt=True))["input_ids"]
        assert completions == trained
        if loses_bos:
            assert trained[0] == tok.bos_token_id and chat[0] != tok.bos_token_id
        else:
            assert chat == trained
