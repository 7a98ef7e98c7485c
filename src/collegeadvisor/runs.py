"""Run directories and their manifest: the only way later stages find a base model, template and adapter.

A run directory holds `manifest.json` (status running | complete | failed), `adapter/`, `checkpoints/`,
`metrics.jsonl` and `samples.jsonl`. `latest` means the newest *complete* run, never a failed or half-written one.
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from collegeadvisor.chat_format import encode_prompt, render_text, template_hash
from collegeadvisor.errors import ManifestError, ModelError
from collegeadvisor.fsutil import atomic_write_json
from collegeadvisor.integrity import verify_adapter, verify_manifest
from collegeadvisor.kb import Retriever, retriever
from collegeadvisor.llamacpp import LlamaCpp, gguf_for_run
from collegeadvisor.remote import RemoteEngine, api_key_from_env
from collegeadvisor.models import base_fingerprint, load_model, load_tokenizer, pick_device, resolve_base_model

MANIFEST = "manifest.json"
PACKAGES = ("collegeadvisor", "torch", "transformers", "peft", "accelerate", "chromadb", "sentence-transformers")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = now()
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{run_dir}: no {MANIFEST}; not a collegeadvisor run directory")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}:{exc.lineno}: corrupt manifest ({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: corrupt manifest (not UTF-8)") from exc
    if not isinstance(m, dict):
        raise ManifestError(f"{path}: corrupt manifest (a JSON {type(m).__name__}, not an object)")
    return m


def find_run(run: str | Path, output_dir: str | Path = "runs", require_complete: bool = True) -> Path:
    """A run directory from a path or `latest` (the newest complete run under output_dir)."""
    if str(run) == "latest":
        root = Path(output_dir)
        done = []
        for d in root.glob("*/") if root.is_dir() else []:
            try:
                m = read_manifest(d)
            except ManifestError:
                continue
            if m.get("status") == "complete" and (d / "adapter").is_dir():
                done.append((m.get("finished", ""), d))
        if not done:
            raise ManifestError(f"--run latest: no complete run under {root}/ (train one with `collegeadvisor train`)")
        return max(done)[1]
    path = Path(run)
    m = read_manifest(path)
    if require_complete and m.get("status") != "complete":
        raise ManifestError(
            f"{path}: run status is '{m.get('status')}', not complete"
            + (f" ({m['error']})" if m.get("error") else "")
            + "; pick a finished run or resume it with `collegeadvisor train --resume`"
        )
    return path


class Mismatch(NamedTuple):
    """One way a run does not match what it is given: `what` is base_model (another base model), weights (the base
    model's files changed: `key` config_sha256 or gguf_sha256) or template (another chat template)."""

    what: str
    key: str
    trained: str | None
    now: str | None


def run_mismatches(manifest: dict[str, Any], base_model: str | None = None, resolved: str | None = None,
                   chat_template: str | None = None) -> list[Mismatch]:
    """How a run's manifest differs from a base model spec, the resolved files of its base model and a chat template;
    only what is given is compared, [] when it all matches. Loading refuses on these; check reports them."""
    base = manifest.get("base_model") or {}
    out = []
    if base_model is not None and base_model != base.get("spec"):
        out.append(Mismatch("base_model", "spec", base.get("spec"), base_model))
    elif resolved is not None:
        now_fp = base_fingerprint(base.get("spec"), resolved)
        out += [Mismatch("weights", key, base[key], now_fp[key]) for key in ("config_sha256", "gguf_sha256")
                if base.get(key) and now_fp.get(key) and base[key] != now_fp[key]]
    trained = (manifest.get("format") or {}).get("template_sha256")
    if chat_template is not None and trained and trained != template_hash(chat_template):
        out.append(Mismatch("template", "template_sha256", trained, template_hash(chat_template)))
    return out


def run_tokenizer(run_dir: str | Path, base_model: str | None = None):
    """(tokenizer with the run's chat template, manifest, the base model's folder), refusing any mismatch between
    the manifest and what loads."""
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    verify_manifest(run_dir, m)
    base = m["base_model"]
    if wrong := run_mismatches(m, base_model=base_model):
        raise ManifestError(
            f"{run_dir}: the run was trained on base model '{wrong[0].trained}', not '{wrong[0].now}'; "
            "its adapter only fits its own base model"
        )
    resolved = resolve_base_model(base["spec"])
    if wrong := run_mismatches(m, resolved=resolved):
        key, trained, now_sha = wrong[0].key, wrong[0].trained, wrong[0].now
        raise ManifestError(
            f"{run_dir}: base model '{base['spec']}' at {resolved} has {key} {now_sha[:12]}, "
            f"but the run was trained on {trained[:12]}; refusing to load its adapter on another model"
        )
    fmt = m["format"]
    tok = load_tokenizer(resolved, chat_template=fmt["chat_template"])
    shipped = load_tokenizer(resolved)
    if run_mismatches(m, chat_template=shipped.chat_template or ""):
        # the manifest's template wins; say so, since the model folder changed under the run
        print(f"note: {resolved} ships another chat template than run {run_dir.name}; using the run's", file=sys.stderr)
    for name in ("eos", "bos", "pad"):
        if fmt[name]["id"] is not None and tok.convert_tokens_to_ids(fmt[name]["token"]) != fmt[name]["id"]:
            raise ManifestError(f"{run_dir}: tokenizer maps {name} token {fmt[name]['token']!r} to another id than the run")
    return tok, m, resolved


def load_run(run_dir: str | Path, base_model: str | None = None, device: str = "auto", adapter: bool = True,
             merge: bool = False):
    """(model, tokenizer, manifest) for a run, refusing any mismatch between the manifest and what loads.

    merge: fold the LoRA weights into the base weights (same greedy text, ~30% faster generation on CPU); the
    model stays a PeftModel, so `disable_adapter()` still gives the base model back."""
    import torch  # torch and peft: not loaded until a run is (train, check and the CLI import this module)

    run_dir = Path(run_dir)
    tok, m, resolved = run_tokenizer(run_dir, base_model)
    base = m["base_model"]
    dev = pick_device(device)
    dtype = torch.bfloat16 if dev.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    model = load_model(resolved, dtype=dtype, device=dev)
    if adapter:
        from peft import PeftModel  # see torch above

        adir = verify_adapter(run_dir, m)  # inside the run, no symlink or pickle, sha256 as recorded
        cfg_path = adir / "adapter_config.json"
        if not cfg_path.is_file():
            raise ManifestError(f"{run_dir}: no adapter/ (the run did not finish)")
        trained_on = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
        if trained_on and Path(trained_on).name != Path(resolved).name and trained_on != base["spec"]:
            raise ModelError(f"{cfg_path}: adapter was trained on '{trained_on}', the manifest names '{resolved}'")
        model = PeftModel.from_pretrained(model, adir)
        if merge:
            model.merge_adapter()
    model.eval()
    return model, tok, m


def load_engine(run_dir: str | Path, engine: str = "torch", device: str = "auto", gguf: str | None = None,
                threads: int | None = None, url: str | None = None, model: str | None = None,
                grammar: str = "llamacpp"):
    """(model or engine, tokenizer, manifest) for answering with a run: `torch` (base + merged adapter, as
    `load_run`), `llamacpp` (the run's GGUF export, refused unless it came from this run's template and adapter)
    or `openai` (an OpenAI-compatible server at `url` serving the run's export; key: COLLEGEADVISOR_ENGINE_KEY)."""
    if engine == "torch":
        return load_run(run_dir, device=device, merge=True)
    if engine == "openai":
        if not url:
            raise ManifestError("--engine openai needs --engine-url (the server's address)")
        tok, m, _ = run_tokenizer(run_dir)
        return RemoteEngine(url, tok, model, grammar, api_key_from_env()), tok, m
    if engine != "llamacpp":
        raise ManifestError(f"--engine {engine}: choose torch, llamacpp or openai")
    tok, m, _ = run_tokenizer(run_dir)
    verify_adapter(Path(run_dir), m)
    path = gguf_for_run(run_dir, m, gguf)
    engine_ = LlamaCpp(path, threads=threads)
    probe = [{"role": "user", "content": "What do graduates of the Bachelor's Degree in Nursing at Ohio University "
                                         "earn? [1] $54,321."}]
    ids, head = encode_prompt(tok, probe), m["format"].get("bos_prefix_ids") or []
    theirs = engine_.tokenize(render_text(tok, probe, add_generation_prompt=True))
    if engine_.n_vocab() != len(tok) or theirs not in (ids, ids[len(head):] if ids[:len(head)] == head else ids):
        raise ManifestError(f"{path}: its tokenizer encodes prompts differently from run {Path(run_dir).name}'s")
    return engine_, tok, m


def settle_run(settings) -> Path:
    """The run a command's settings name ('latest' found), written back into them as its path (what the settings
    saved beside its output then say)."""
    run = find_run(settings.run, settings.output_dir)
    settings.run = str(run)
    return run


def open_run(settings, log=None) -> tuple[Path, Retriever | None, Any, Any, dict]:
    """What chat and serve answer with, from their settings (config.GenerationSettings): the run, its retriever,
    and the engine's model (or engine), tokenizer and manifest. `log` gets the settings line before the slow load."""
    run = settle_run(settings)
    if log is not None:
        log(settings)
    retrieve = retriever_for(settings, run)
    return (run, retrieve, *load_engine(run, settings.engine, settings.device, **engine_options(settings)))


def engine_options(settings) -> dict:
    """load_engine's options from a command's settings (config.GenerationSettings)."""
    return dict(gguf=settings.gguf, threads=settings.threads, url=settings.engine_url, model=settings.engine_model,
                grammar=settings.engine_grammar)


def run_retriever(run_dir: str | Path, rag: bool | None = None, k: int | None = None, kb_path: str | None = None,
                  kb_url: str | None = None) -> Retriever | None:
    """question -> hits from the knowledge base when the run was trained to read retrieved rows (rag None) or
    rag is True; None when rag is False or the run reads none. k as in training unless given."""
    trained = read_manifest(run_dir).get("retrieval") or {}
    if not (rag if rag is not None else bool(trained)):
        return None
    return retriever(k=k or trained.get("k") or 3, path=kb_path, url=kb_url)


def retriever_for(settings, run_dir: str | Path) -> Retriever | None:
    """run_retriever with a command's settings (config.GenerationSettings: rag, k, kb_path, kb_url)."""
    return run_retriever(run_dir, settings.rag, settings.k, settings.kb_path, settings.kb_url)
