"""Fixtures: real tokenizers (SmolLM2's, and one with TinyLlama's template and special tokens) and tiny
random Llama models built on them in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tinyllama-1.1b-chat-v1.0.json"
TINYLLAMA_FALLBACK = Path(__file__).parent / "data" / "tinyllama-1.1b-chat-v1.0.json"

CORPUS = [
    "What is the median earnings for graduates of the nursing program at Stanford University?",
    "Graduates earned a median of $65,432 four years after completion (College Scorecard).",
    "The College Scorecard has no data for this program because the cohort is too small.",
    "Does a Bachelor's Degree in Computer Science at Ohio State University pay more than high school?",
    "Yes. Its graduates earn $24,310 more than a typical high-school graduate in the state.",
    "Median debt at graduation: $23,250. Debt-to-earnings ratio: 0.41. About 4%.",
    "Hello! How can I help you with college choices today? admission rate answer question",
]


def tinyllama_reference() -> dict:
    path = REFERENCE if REFERENCE.is_file() else TINYLLAMA_FALLBACK
    return json.loads(path.read_text())


def build_tinyllama_tokenizer(out: Path):
    """A SentencePiece-style (Metaspace) BPE tokenizer with TinyLlama's specials (<unk>=0, <s>=1, </s>=2),
    BOS added by the tokenizer, and TinyLlama's exact chat template; role markers are plain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    ref = tinyllama_reference()["tokenizer"]
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    chars = [chr(c) for c in range(32, 127)] + ["\n", "▁"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=chars)
    tk.train_from_iterator(CORPUS * 3 + [ref["chat_template"], "<|user|>\n<|assistant|>\n<|system|>\n"], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tok.chat_template = ref["chat_template"]
    tok.save_pretrained(out)
    return tok


def build_tiny_model(tokenizer, out: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama on the given tokenizer, saved with it as a local base-model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smol_tokenizer(tmp_path_factory):
    """SmolLM2-135M-Instruct's real tokenizer, read from the embedded GGUF (no weights loaded)."""
    from transformers import AutoTokenizer

    from collegeadvisor.models import embedded_gguf

    gguf = embedded_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smol_tok")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="session")
def tinyllama_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tinyllama_tok")
    build_tinyllama_tokenizer(out)
    return AutoTokenizer.from_pretrained(out)


@pytest.fixture(scope="session", params=["smollm2", "tinyllama"])
def tokenizer(request, smol_tokenizer, tinyllama_tokenizer):
    return {"smollm2": smol_tokenizer, "tinyllama": tinyllama_tokenizer}[request.param]


@pytest.fixture(scope="session")
def smol_tiny_model(tmp_path_factory, smol_tokenizer) -> Path:
    return build_tiny_model(smol_tokenizer, tmp_path_factory.mktemp("smol_tiny"))


@pytest.fixture(scope="session")
def tinyllama_tiny_model(tmp_path_factory, tinyllama_tokenizer) -> Path:
    return build_tiny_model(tinyllama_tokenizer, tmp_path_factory.mktemp("tinyllama_tiny"))


@pytest.fixture(scope="session", params=["smollm2", "tinyllama"])
def tiny_model(request, smol_tiny_model, tinyllama_tiny_model) -> Path:
    return {"smollm2": smol_tiny_model, "tinyllama": tinyllama_tiny_model}[request.param]


HELDOUT = [
    {"question": "What do graduates of program 3 earn at school 3?", "answer": "Graduates earned a median of $30,111.",
     "numeric": 30111.0, "kind": "earnings", "source": {"row_id": "x:1:3"}},
    {"question": "Is program 5 at school 5 worth it compared to high school?", "answer": "Yes. $4,000 more.",
     "numeric": 4000.0, "kind": "premium", "yes": True, "source": {"row_id": "x:2:3"}},
    {"question": "What is the median debt for program 9 at school 2?", "answer": "The College Scorecard has no data.",
     "numeric": None, "kind": "no_data", "source": {"row_id": "x:3:3"}},
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tinyllama_tiny_model) -> Path:
    """A complete 10-step run on the tiny TinyLlama-template model, with heldout.jsonl beside its data."""
    from collegeadvisor.config import load_config
    from collegeadvisor.train import train
    from helpers import advisor_rows, write_jsonl

    root = tmp_path_factory.mktemp("trained")
    data = write_jsonl(root / "scorecard.jsonl", advisor_rows(40))
    write_jsonl(root / "heldout.jsonl", HELDOUT)
    cfg = load_config(None, dict(base_model=str(tinyllama_tiny_model), data=str(data), output_dir=str(root / "runs"),
                                 max_steps=10, batch_size=4, grad_accum=1, learning_rate=1e-2, sample_every=0,
                                 val_fraction=0.1, run_name="tiny"))
    return train(cfg)


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory, smol_tiny_model):
    """A complete 3-step run on the tiny model with SmolLM2's real (byte-level BPE, ChatML) tokenizer."""
    from collegeadvisor.config import load_config
    from collegeadvisor.train import train
    from helpers import advisor_rows, write_jsonl

    root = tmp_path_factory.mktemp("smol_run")
    data = write_jsonl(root / "scorecard.jsonl", advisor_rows(12))
    cfg = load_config(None, dict(base_model=str(smol_tiny_model), data=str(data), output_dir=str(root / "runs"),
                                 max_steps=3, batch_size=4, grad_accum=1, learning_rate=2e-2, sample_every=0,
                                 val_fraction=0.0, run_name="smol"))
    return train(cfg, log=lambda _: None)


@pytest.fixture(scope="session")
def gguf_run(tmp_path_factory, smol_run):
    """smol_run and its f32 GGUF export (in a folder of its own, with the export's record beside it)."""
    from collegeadvisor.export import export_gguf

    return smol_run, export_gguf(smol_run, tmp_path_factory.mktemp("smol_gguf"), "f32")
