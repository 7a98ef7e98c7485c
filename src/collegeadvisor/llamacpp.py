"""The llama.cpp engine (`--engine llamacpp`): a run's GGUF export run by llama-cpp-python, with the torch engine's
prompts, constraint and check.

`generate.generate` and `generate.stream_batch` hand an engine each prompt's token ids (chat_format's rendering from
the run's manifest, so they are the torch engine's tokens, token for token) and the grounding constraint
(`generate.GroundedDecoding`, which llama-cpp-python applies per call as a logits processor); the check, its retries
and the fallback stay in `generate.answer`. Greedy replies to several prompts (`complete_many`: eval, the server's
grouped requests) are decoded side by side, up to `PARALLEL` of them, as sequences of one llama.cpp context that
share each pass: one pass reads the weights once for all of them. Each sequence keeps the KV cache of the longest
start its next prompt shares with its last one (the template's head, the system prompt).

`gguf_for_run` finds the run's export and refuses one whose chat template or adapter differs from the run's: the
export records both (`collegeadvisor-export.json` beside the file).

The engine is an optional extra: pip install 'collegeadvisor[llamacpp]' (built from source: cmake and a C++ compiler).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from collegeadvisor.errors import AdvisorError, ManifestError, missing_dependency

PROVENANCE = "collegeadvisor-export.json"
DEFAULT_GGUF = Path("export") / "gguf" / "model-q8_0.gguf"  # inside the run: what `export --to gguf` writes
N_CTX = 4096  # a grounded prompt is ~420 tokens, answers a few hundred: room for a conversation too
LOOKUP_DRAFT = 4  # prompt lookup: tokens guessed per pass (0: token by token)
LOOKUP_NGRAM = 3  # the longest run of the reply's last tokens looked up in the prompt
PARALLEL = 4  # greedy replies decoded side by side (complete_many), each a sequence with its own N_CTX of cache
N_BATCH = 2048  # most tokens one llama.cpp pass takes (the prompts of several replies at once)
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


_PROBE = "import sys; from collegeadvisor.llamacpp import _amx_agrees; sys.exit(not _amx_agrees(sys.argv[1], int(sys.argv[2])))"
AMX_TOLERANCE = 0.1  # mean |AMX - AVX-512| logit difference allowed, in standard deviations of the logits


@lru_cache(maxsize=None)
def amx_runs(gguf: str, threads: int) -> bool:
    """Whether llama.cpp's AMX kernels run `gguf` here, and agree with its AVX-512 ones. Stock llama.cpp's AMX matmul
    (an "extra buffer type" for quantized weights) crashes on these Xeons at its first tile instruction (llama.cpp
    issue 20824: the tile configuration is loaded from the stack once per thread); the build of
    third_party/llama-cpp-python carries the fix, and with it prefill and decode run about 2x faster (BENCHMARKS.md,
    Engines). A crash takes the process, so the build is asked in a child process (`_amx_agrees`, ~1 s, once per
    file and process). True where the CPU has no AMX: nothing to ask."""
    if not _has_amx():
        return True
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, gguf, str(threads)], capture_output=True, timeout=300)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _amx_agrees(gguf: str, threads: int) -> bool:
    """The logits of a 64-token prefill of `gguf` with llama.cpp's extra buffer types (AMX where the CPU has it) and
    without: finite, and within AMX_TOLERANCE of each other. They are not equal: the AMX kernels quantize the
    activations their own way, and on SmolLM2's q8_0 export they are as close to the f32 export's logits as the
    AVX-512 kernels are (mean |difference| 0.22 either way, 0.14 between them, logits' deviation 3.8). On a model as
    narrow as 32 wide, the AMX kernels' logits were NaN."""
    import llama_cpp
    import numpy as np

    api, scores = llama_cpp.llama_cpp, []
    defaults = api.llama_model_default_params
    try:
        for extra in (False, True):
            api.llama_model_default_params = defaults if extra else (lambda: _without_extra_bufts(defaults()))
            llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_batch=256, n_threads=threads,
                                  n_threads_batch=threads, logits_all=True, verbose=False)
            tokens = [t % llm.n_vocab() for t in range(64, 128)]
            llm.eval(tokens)
            scores.append(np.array(llm.scores[:len(tokens)], dtype=np.float64))
            llm.close()
    finally:
        api.llama_model_default_params = defaults
    avx, amx = scores
    return bool(np.isfinite(amx).all() and np.abs(amx - avx).mean() <= AMX_TOLERANCE * avx.std())


class LlamaCpp:
    """One llama.cpp context over a GGUF file. `complete` generates for one prompt of token ids."""

    engine = "llamacpp"

    def __init__(self, gguf: str | Path, threads: int | None = None, n_ctx: int = N_CTX, draft: int = LOOKUP_DRAFT,
                 parallel: int = PARALLEL):
        try:  # llama-cpp-python: the optional extra, loaded with the engine
            import llama_cpp
        except ImportError as exc:
            raise missing_dependency("llama-cpp-python", extra="llamacpp") from exc
        threads = threads or os.cpu_count() or 1
        api = llama_cpp.llama_cpp
        model_defaults, context_defaults = api.llama_model_default_params, api.llama_context_default_params
        with _LOAD:
            # where llama.cpp's AMX matmul would crash (amx_runs), no extra buffer types: the AVX-512 kernels run
            # instead. Elsewhere the AMX or repacked kernels stay on.
            self.amx = _has_amx() and amx_runs(str(gguf), threads)
            if _has_amx() and not self.amx:
                api.llama_model_default_params = lambda: _without_extra_bufts(model_defaults())
            # `parallel` sequences, each with a cache of its own n_ctx (llama-cpp-python's Llama sets one sequence)
            api.llama_context_default_params = lambda: _sequences(context_defaults(), parallel)
            try:
                self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx * parallel, n_batch=N_BATCH,
                                           n_threads=threads, n_threads_batch=threads, verbose=False)
            except ValueError as exc:
                raise AdvisorError(f"{gguf}: llama.cpp could not load it ({exc})") from None
            finally:
                api.llama_model_default_params, api.llama_context_default_params = model_defaults, context_defaults
        self.path, self.threads, self.n_ctx, self.draft = Path(gguf), threads, n_ctx, draft
        self.parallel = parallel
        self.cached: list[list[int]] = [[] for _ in range(parallel)]  # the tokens each sequence's cache holds
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
        amx = ", AMX kernels" if self.amx else ""
        return (f"llamacpp ({self.path.name}, {self.threads} threads{amx}{lookup}, "
                f"{self.parallel} replies side by side)")

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

        Greedy replies (temperature 0, what serve and eval use) are `complete_many`'s; sampled ones come from
        llama-cpp-python's `generate`."""
        if not temperature:
            return self.complete_many([prompt], max_new_tokens, [constraint], stops, [on_token], [cancel])[0]
        with self.lock:  # generate() uses sequence 0: complete_many reads llama-cpp-python's record of it back
            return self._sampled(list(prompt), max_new_tokens, temperature, top_p, constraint, set(stops), on_token,
                                 cancel)

    def complete_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      constraints: Sequence[Callable | None], stops: Sequence[int] = (),
                      on_tokens: Sequence[Callable[[int], None] | None] | None = None,
                      cancels: Sequence[threading.Event | None] | None = None) -> list[list[int]]:
        """Greedy replies to `prompts` (as `complete`'s, one constraint, callback and cancel event each), decoded
        side by side: up to `parallel` at once, each a sequence of the context, all in one llama.cpp pass a step;
        a finished reply's sequence takes the next prompt."""
        n = len(prompts)
        on_tokens, cancels = list(on_tokens or [None] * n), list(cancels or [None] * n)
        outs: list[list[int]] = [[] for _ in range(n)]
        replies = [_Reply(list(p), c, outs[i], _emitter(outs[i], max_new_tokens, set(stops), on_tokens[i], cancels[i]),
                          max_new_tokens) for i, (p, c) in enumerate(zip(prompts, constraints))]
        with self.lock:
            try:
                self._decode_side_by_side(replies)
            finally:  # sequence 0 is llama-cpp-python's own: its record of that cache, for a later `generate`
                llm = self.llm
                llm.input_ids[:len(self.cached[0])] = self.cached[0]
                llm.n_tokens = len(self.cached[0])
                llm._requires_eval = True  # the logits left behind are not sequence 0's last token's
        return outs

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

    def _decode_side_by_side(self, replies: list["_Reply"]) -> None:
        """Greedy decoding with prompt lookup (speculative decoding whose drafts are the tokens that followed the
        reply's last few tokens earlier in the prompt or reply: llama-cpp-python's `LlamaPromptLookupDecoding`),
        for several replies at once. Grounded answers copy names and figures from their rows, so most drafts are
        accepted, and one pass checks a draft of `self.draft` tokens for about the cost of one token. Each pass
        holds, for every reply in a sequence, its last token and draft, or its prompt (the part its sequence's cache
        lacks): the weights are read once for all of them. Each token is still chosen from its own logits under
        its reply's constraint, given exactly the tokens before it, so each reply is the one token-by-token greedy
        decoding writes (up to the float rounding of a batched pass)."""
        import numpy as np
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        def lookup(seen: list[int], most: int) -> list[int]:
            if not self.draft or most <= 0:
                return []
            found = LlamaPromptLookupDecoding.find_candidate_pred_tokens(np.asarray(seen, dtype=np.intc),
                                                                         LOOKUP_NGRAM, self.draft)
            return [int(t) for t in found[:most]]

        llm, ctx, n_vocab = self.llm, self.llm._ctx, self.llm.n_vocab()
        self.cached[0] = llm.input_ids[:llm.n_tokens].tolist()
        waiting, active = list(reversed(replies)), {}
        while waiting or active:
            for seq in range(self.parallel):  # a free sequence takes the next prompt
                if seq not in active and waiting:
                    reply = active[seq] = waiting.pop()
                    kept = llm.longest_token_prefix(self.cached[seq], reply.prompt[:-1])
                    ctx.kv_cache_seq_rm(seq, kept, -1)
                    del self.cached[seq][kept:]
                    reply.feed = reply.prompt[kept:]
            batch, spans, at = llm._batch.batch, [], 0
            for seq, reply in sorted(active.items(), key=lambda kv: kv[1].prefill):  # drafts first, then prompts
                feed = reply.feed[:N_BATCH - at]
                if not feed:
                    break
                for j, token in enumerate(feed):
                    batch.token[at + j], batch.pos[at + j] = token, len(self.cached[seq]) + j
                    batch.seq_id[at + j][0], batch.n_seq_id[at + j] = seq, 1
                    batch.logits[at + j] = not reply.prefill or len(feed) == len(reply.feed) and j == len(feed) - 1
                spans.append((seq, at, len(feed)))
                at += len(feed)
            batch.n_tokens = at
            ctx.decode(llm._batch)
            for seq, at, n in spans:
                reply = active[seq]
                fed, reply.feed = reply.feed[:n], reply.feed[n:]
                self.cached[seq] += fed
                if reply.feed:
                    continue  # the rest of the prompt in the next pass
                rows = [np.ctypeslib.as_array(ctx.get_logits_ith(at + j), shape=(n_vocab,))
                        for j in ([n - 1] if reply.prefill else range(n))]
                token, keep = reply.chosen(rows, fed)
                if token is None or reply.emit(token):
                    del active[seq]
                    continue
                if keep < n:  # a wrong guess: the cache keeps the tokens before it
                    del self.cached[seq][len(self.cached[seq]) - n + keep:]
                    ctx.kv_cache_seq_rm(seq, len(self.cached[seq]), -1)
                room = self.n_ctx - len(self.cached[seq]) - 1
                if room < 0:
                    del active[seq]
                    continue
                most = min(room, reply.max_new_tokens - len(reply.out))
                reply.feed = [token] + lookup(reply.prompt + reply.out, most)


class _Reply:
    """One greedy reply being decoded in a sequence: its prompt, constraint, reply so far and emitter, and what the
    next pass feeds its sequence (the prompt's uncached part first, then the last chosen token and its draft)."""

    __slots__ = ("prompt", "constraint", "out", "emit", "max_new_tokens", "feed", "prefill")

    def __init__(self, prompt: list[int], constraint, out: list[int], emit, max_new_tokens: int):
        self.prompt, self.constraint, self.out, self.emit = prompt, constraint, out, emit
        self.max_new_tokens, self.feed, self.prefill = max_new_tokens, [], True

    def pick(self, row) -> int:
        if self.constraint is None:
            return int(row.argmax())
        return int(_masked(self.constraint, self.prompt + self.out, row).argmax())

    def chosen(self, rows, fed: list[int]) -> tuple[int | None, int]:
        """(the next token, how many of the tokens `fed` stay in the cache) after a pass: `rows` are the logits of
        the prompt's last token, or of the last chosen token and each guess of its draft. Guesses that greedy
        decoding chooses too are emitted on the way, and stay; a wrong one and those after it go. None: the reply
        ended among the guesses."""
        if self.prefill:
            self.prefill = False
            return self.pick(rows[0]), len(fed)
        for j, guess in enumerate(fed[1:]):
            token = self.pick(rows[j])
            if token != guess:
                return token, j + 1
            if self.emit(token):
                return None, j + 2
        return self.pick(rows[len(fed) - 1]), len(fed)


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


def _sequences(params, n: int):
    params.n_seq_max = n
    params.kv_unified = False  # each sequence a cache of its own n_ctx / n_seq_max cells
    return params
