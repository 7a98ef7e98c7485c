"""The llama.cpp engine (`--engine llamacpp`): a run's GGUF export run by llama-cpp-python, with the torch engine's
prompts, constraint and check.

`generate.generate` and `generate.stream_batch` hand an engine each prompt's token ids (chat_format's rendering from
the run's manifest, so they are the torch engine's tokens, token for token) and the grounding constraint
(`generate.GroundedDecoding`, which llama-cpp-python applies per call as a logits processor); the check, its retries
and the fallback stay in `generate.answer`. Prompts run one after another on one llama.cpp context, which keeps the
KV cache of the longest start a prompt shares with the one before (the template's head, the system prompt).

`gguf_for_run` finds the run's export and refuses one whose chat template or adapter differs from the run's: the
export records both (`collegeadvisor-export.json` beside the file).

The engine is an optional extra: pip install 'collegeadvisor[llamacpp]' (built from source: cmake and a C++ compiler).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable, Sequence

from collegeadvisor.errors import AdvisorError, ManifestError, missing_dependency

PROVENANCE = "collegeadvisor-export.json"
DEFAULT_GGUF = Path("export") / "gguf" / "model-q8_0.gguf"  # inside the run: what `export --to gguf` writes
N_CTX = 4096  # a grounded prompt is ~420 tokens, answers a few hundred: room for a conversation too
_LOAD = threading.Lock()


def adapter_sha256(manifest: dict) -> str | None:
    """The run's adapter weights, by their recorded digest."""
    return ((manifest.get("adapter") or {}).get("files") or {}).get("adapter_model.safetensors")


def gguf_for_run(run_dir: str | Path, manifest: dict, gguf: str | Path | None = None) -> Path:
    """The run's GGUF export (`gguf`, or RUN/export/gguf/model-q8_0.gguf), refused unless the export beside it says it
    came from this run's chat template and adapter."""
    path = Path(gguf) if gguf else Path(run_dir) / DEFAULT_GGUF
    if not path.is_file():
        raise AdvisorError(f"{path}: no GGUF export; write it with: collegeadvisor export --to gguf --run {run_dir}")
    record = path.parent / PROVENANCE
    try:
        said = json.loads(record.read_text())
    except (OSError, ValueError):
        raise ManifestError(f"{record}: missing or unreadable, so nothing says which run {path.name} came from; "
                            f"export it again with: collegeadvisor export --to gguf --run {run_dir}") from None
    if said.get("template_sha256") != manifest["format"]["template_sha256"]:
        raise ManifestError(f"{path}: exported with another chat template than run {Path(run_dir).name}'s; "
                            "its prompts would not be the ones the run was trained on")
    if said.get("adapter_sha256") != adapter_sha256(manifest):
        raise ManifestError(f"{path}: exported from another adapter than run {Path(run_dir).name}'s "
                            f"({str(said.get('adapter_sha256'))[:12]} vs {str(adapter_sha256(manifest))[:12]})")
    return path


def _has_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


class LlamaCpp:
    """One llama.cpp context over a GGUF file. `complete` generates for one prompt of token ids."""

    engine = "llamacpp"

    def __init__(self, gguf: str | Path, threads: int | None = None, n_ctx: int = N_CTX):
        try:  # llama-cpp-python: the optional extra, loaded with the engine
            import llama_cpp
        except ImportError as exc:
            raise missing_dependency("llama-cpp-python", extra="llamacpp") from exc
        threads = threads or os.cpu_count() or 1
        defaults = llama_cpp.llama_cpp.llama_model_default_params
        with _LOAD:
            # llama.cpp's AMX matmul (an "extra buffer type") crashes in ggml_backend_amx_mul_mat on these Xeons;
            # without extra buffer types the AVX-512 kernels run instead. Elsewhere the repacked kernels stay on.
            if _has_amx():
                llama_cpp.llama_cpp.llama_model_default_params = lambda: _without_extra_bufts(defaults())
            try:
                self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads,
                                           n_threads_batch=threads, verbose=False)
            except ValueError as exc:
                raise AdvisorError(f"{gguf}: llama.cpp could not load it ({exc})") from None
            finally:
                llama_cpp.llama_cpp.llama_model_default_params = defaults
        self.path, self.threads, self.n_ctx = Path(gguf), threads, n_ctx
        self.lock = threading.Lock()  # one context: one generation at a time
        self._processors = llama_cpp.LogitsProcessorList

    def describe(self) -> str:
        return f"llamacpp ({self.path.name}, {self.threads} threads)"

    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of a rendered prompt (special tokens as tokens, no BOS added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def complete(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 constraint: Callable | None = None, stops: Sequence[int] = (),
                 on_token: Callable[[int], None] | None = None, cancel: threading.Event | None = None) -> list[int]:
        """The new token ids after `prompt`, up to and including the first stop id, at most max_new_tokens;
        `constraint(input_ids, scores)` (a transformers LogitsProcessor over one row) masks the scores of each step
        before sampling; `on_token` gets each id as it comes; a set `cancel` ends the reply."""
        import numpy as np  # with llama_cpp: only once the engine runs
        import torch

        def masked(input_ids, scores):
            row = torch.from_numpy(np.array(scores, dtype=np.float32))
            constraint(torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[None], row[None])
            return row.numpy()

        sampling = dict(temp=float(temperature or 0.0), top_p=float(top_p) if temperature else 1.0, top_k=0,
                        min_p=0.0, repeat_penalty=1.0)
        procs = self._processors([masked]) if constraint is not None else None
        out: list[int] = []
        stop_ids = set(stops)
        with self.lock:
            for token in self.llm.generate(list(prompt), logits_processor=procs, **sampling):
                out.append(int(token))
                if on_token is not None:
                    on_token(int(token))
                if token in stop_ids or len(out) >= max_new_tokens or (cancel is not None and cancel.is_set()):
                    break
        return out


def _without_extra_bufts(params):
    params.use_extra_bufts = False
    return params
