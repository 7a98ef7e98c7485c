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
import weakref
from pathlib import Path
from typing import Callable, Sequence

from collegeadvisor.errors import AdvisorError, ManifestError, missing_dependency

PROVENANCE = "collegeadvisor-export.json"
DEFAULT_GGUF = Path("export") / "gguf" / "model-q8_0.gguf"  # inside the run: what `export --to gguf` writes
N_CTX = 4096  # a grounded prompt is ~420 tokens, answers a few hundred: room for a conversation too
LOOKUP_DRAFT = 4  # prompt lookup: tokens guessed per pass (0: token by token)
LOOKUP_NGRAM = 3  # the longest run of the reply's last tokens looked up in the prompt
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

    def __init__(self, gguf: str | Path, threads: int | None = None, n_ctx: int = N_CTX, draft: int = LOOKUP_DRAFT):
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
        self.path, self.threads, self.n_ctx, self.draft = Path(gguf), threads, n_ctx, draft
        # llama.cpp's threads own the cores. What torch does in this process beside it (the constraint's masks at
        # each token, the knowledge base's query embedding) is small, and on torch's own pool of threads it
        # contended with llama.cpp's: served replies took 1.2-1.3 s instead of 0.93-0.97 (BENCHMARKS.md, Engines)
        torch_threads(1)
        self.lock = threading.Lock()  # one context: one generation at a time
        # closed before the interpreter tears its modules down: llama-cpp-python's own __del__ at exit raised
        # "'NoneType' object is not callable" into the user's terminal
        weakref.finalize(self, self.llm.close)
        self._processors = llama_cpp.LogitsProcessorList

    def describe(self) -> str:
        lookup = f", prompt lookup {self.draft}" if self.draft else ""
        return f"llamacpp ({self.path.name}, {self.threads} threads{lookup})"

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
        before sampling; `on_token` gets each id as it comes; a set `cancel` ends the reply.

        Greedy replies (temperature 0, what serve and eval use) decode with prompt lookup (`_greedy`); sampled ones
        through llama-cpp-python's `generate`."""
        with self.lock:
            if not temperature and self.draft:
                try:
                    return self._greedy(list(prompt), max_new_tokens, constraint, set(stops), on_token, cancel)
                finally:  # the logits left behind are not the cached tokens' last: a later `generate` must eval
                    self.llm._requires_eval = True
            return self._sampled(list(prompt), max_new_tokens, temperature, top_p, constraint, set(stops), on_token,
                                 cancel)

    def _sampled(self, prompt, max_new_tokens, temperature, top_p, constraint, stop_ids, on_token, cancel):
        sampling = dict(temp=float(temperature or 0.0), top_p=float(top_p) if temperature else 1.0, top_k=0,
                        min_p=0.0, repeat_penalty=1.0)
        masked = (lambda input_ids, scores: _masked(constraint, input_ids, scores).numpy())
        procs = self._processors([masked]) if constraint is not None else None
        out: list[int] = []
        emit = _emitter(out, max_new_tokens, stop_ids, on_token, cancel)
        for token in self.llm.generate(prompt, logits_processor=procs, **sampling):
            if emit(int(token)):
                break
        return out

    def _greedy(self, prompt, max_new_tokens, constraint, stop_ids, on_token, cancel) -> list[int]:
        """Greedy decoding with prompt lookup (speculative decoding whose drafts are the tokens that followed the
        reply's last few tokens earlier in the prompt or reply: llama-cpp-python's `LlamaPromptLookupDecoding`).
        Grounded answers copy names and figures from their rows, so most drafts are accepted, and one llama.cpp
        pass checks a draft of `self.draft` tokens for about the cost of one token. Each token is still chosen
        from its own logits under `constraint`, given exactly the tokens before it, so the reply is the one
        token-by-token greedy decoding writes (up to the float rounding of a batched pass)."""
        import numpy as np
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        llm, n_vocab = self.llm, self.llm.n_vocab()
        out: list[int] = []
        emit = _emitter(out, max_new_tokens, stop_ids, on_token, cancel)

        def pick(row) -> int:
            return int(np.argmax(row) if constraint is None else _masked(constraint, prompt + out, row).argmax())

        # the KV cache keeps the start this prompt shares with the last one (the template's head, the system prompt)
        llm.n_tokens = llm.longest_token_prefix(llm.input_ids[:llm.n_tokens], prompt[:-1])
        llm.eval(prompt[llm.n_tokens:])  # logits of the last prompt token only
        token = pick(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)))
        while not emit(token):
            room = self.n_ctx - llm.n_tokens - 1
            if room < 0:
                break
            seen = np.asarray(prompt + out, dtype=np.intc)
            draft = [int(t) for t in LlamaPromptLookupDecoding.find_candidate_pred_tokens(
                seen, LOOKUP_NGRAM, self.draft)[:min(room, max_new_tokens - len(out))]]
            batch, past = [token] + draft, llm.n_tokens
            llm._batch.set_batch(batch=batch, n_past=past, logits_all=True)
            llm._ctx.decode(llm._batch)
            llm.input_ids[past:past + len(batch)] = batch
            llm.n_tokens = past + len(batch)
            rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch), n_vocab))
            for j, guess in enumerate(draft):
                token = pick(rows[j])
                if token != guess:  # the cache keeps the tokens up to the first wrong guess
                    llm.n_tokens = past + j + 1
                    llm._ctx.kv_cache_seq_rm(-1, llm.n_tokens, -1)
                    break
                if emit(token):
                    return out
            else:
                token = pick(rows[len(draft)])
        return out


def _masked(constraint: Callable, input_ids: Sequence[int], scores):
    """One step's scores (a numpy row) as a torch row, masked by `constraint` given the tokens before it."""
    import numpy as np
    import torch

    row = torch.from_numpy(np.array(scores, dtype=np.float32))
    constraint(torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None], row[None])
    return row


def _emitter(out: list[int], max_new_tokens: int, stop_ids: set, on_token, cancel) -> Callable[[int], bool]:
    """emit(token): adds a chosen token to the reply `out` (and hands it to on_token); whether the reply ends there
    (a stop id, the budget spent, cancelled)."""
    def emit(token: int) -> bool:
        out.append(token)
        if on_token is not None:
            on_token(token)
        return token in stop_ids or len(out) >= max_new_tokens or (cancel is not None and cancel.is_set())
    return emit


def torch_threads(n: int) -> None:
    import torch  # with the engine: torch is loaded by then (the tokenizer's run, the constraint)

    torch.set_num_threads(n)


def _without_extra_bufts(params):
    params.use_extra_bufts = False
    return params
