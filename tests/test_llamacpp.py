"""The llama.cpp engine (`--engine llamacpp`) on a tiny run's GGUF export: the torch engine's prompt tokens, the
grounding constraint applied inside llama.cpp's sampling, the export's provenance refused when it isn't the run's,
and serve and eval answering through it. Runs where the optional extra (llama-cpp-python) is installed; `.ci/run`
installs it."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("llama_cpp")

from collegeadvisor.chat_format import encode_prompt, render_text, stop_token_ids, with_context  # noqa: E402
from collegeadvisor.errors import AdvisorError, ManifestError  # noqa: E402
from collegeadvisor.generate import _processors, answer, generate  # noqa: E402
from collegeadvisor.llamacpp import LOOKUP_DRAFT  # noqa: E402
from collegeadvisor.runs import load_engine  # noqa: E402

DOC = ("Test University (OH, public): Bachelor's Degree in Nursing. Completers: 45. Median earnings four years after "
       "completion: $54,321. High-school graduate earnings in OH: $32,100. Earnings premium: $22,221 (passes the "
       "test). Median debt: $23,456. Debt-to-earnings: 0.43. Payback: 4.5 years.")
QUESTIONS = [
    [{"role": "user", "content": "What do graduates of the Bachelor's Degree in Nursing at Test University earn?"}],
    [{"role": "user", "content": "How much debt do nursing grads from Test University have?"}],
]


@pytest.fixture(scope="module", autouse=True)
def _torch_threads_restored():
    """The engine puts torch on one thread for the whole process (beside llama.cpp's): the tests after these get
    their threads back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(gguf_run):
    run, gguf = gguf_run
    return load_engine(run, "llamacpp", gguf=str(gguf), threads=2)


def test_prompts_are_the_torch_engines_token_for_token(engine):
    import torch

    llm, tok, _ = engine
    assert torch.get_num_threads() == 1  # the constraint's torch work leaves the cores to llama.cpp's threads
    assert llm.n_vocab() == len(tok)
    for conv in QUESTIONS:
        messages = with_context(conv, [DOC])
        assert llm.tokenize(render_text(tok, messages, add_generation_prompt=True)) == encode_prompt(tok, messages)


def test_a_constraint_is_applied_inside_llamacpps_sampling(engine):
    llm, tok, _ = engine
    only = tok.convert_tokens_to_ids("7")

    def only_sevens(input_ids, scores):
        keep = scores[0, only].clone()
        scores[:] = float("-inf")
        scores[0, only] = keep
        return scores

    out = llm.complete(encode_prompt(tok, QUESTIONS[0]), 6, constraint=only_sevens)
    assert out == [only] * 6


def _forcing(target: list[int], prompt_len: int):
    """A constraint that leaves only target[k] at the reply's k-th token."""
    def force(input_ids, scores):
        k = input_ids.shape[-1] - prompt_len
        keep = scores[0, target[k]].clone()
        scores[:] = float("-inf")
        scores[0, target[k]] = keep
        return scores
    return force


def test_prompt_lookup_checks_guesses_in_one_pass_and_keeps_only_the_right_ones(engine):
    """Greedy replies decode with prompt lookup: a reply that copies a run of its prompt is checked a draft at a time
    (fewer llama.cpp passes than tokens), each token is still chosen under the constraint given the tokens before
    it, and after a wrong guess the cache holds the reply's own tokens, not the guesses."""
    llm, tok, _ = engine
    prompt = encode_prompt(tok, with_context(QUESTIONS[0], [DOC]))
    copied = tok.encode(" Median earnings four years after completion: $54,321. High-school graduate earnings in OH",
                        add_special_tokens=False)
    target = copied[:9] + tok.encode(" Zebra", add_special_tokens=False) + copied[9:]  # a wrong guess midway
    passes, decode = [], llm.llm._ctx.decode
    llm.llm._ctx.decode = lambda batch: (passes.append(batch.n_tokens()), decode(batch))[1]
    try:
        out = llm.complete(prompt, len(target), constraint=_forcing(target, len(prompt)))
    finally:
        del llm.llm._ctx.decode
    assert out == target
    assert len(passes) < len(target) / 2 and max(passes[1:]) > 1
    cached = list(llm.llm.input_ids[:llm.llm.n_tokens])
    assert cached == (prompt + out)[:len(cached)] and len(cached) >= len(prompt) + len(out) - 1
    llm.draft = 0
    try:  # token by token (and sampled replies, through llama-cpp-python's generate): one pass a token
        passes.clear()
        llm.llm._ctx.decode = lambda batch: (passes.append(batch.n_tokens()), decode(batch))[1]
        assert llm.complete(prompt, len(target), constraint=_forcing(target, len(prompt))) == target
        assert max(passes[1:]) == 1
    finally:
        del llm.llm._ctx.decode
        llm.draft = LOOKUP_DRAFT


def test_a_reply_after_another_reuses_the_shared_start_and_answers_as_if_alone(engine):
    llm, tok, _ = engine
    first, second = (encode_prompt(tok, with_context(q, [DOC])) for q in QUESTIONS)
    llm.llm.reset()
    alone = llm.complete(second, 12)
    llm.complete(first, 12)
    passes, decode = [], llm.llm._ctx.decode
    llm.llm._ctx.decode = lambda batch: (passes.append(batch.n_tokens()), decode(batch))[1]
    try:
        again = llm.complete(second, 12)
    finally:
        del llm.llm._ctx.decode
    assert again == alone
    assert passes[0] < len(second) - 20  # the template's head and the rows were not evaluated again


def test_after_a_citation_the_engine_writes_only_the_cited_rows_name(engine):
    """The grounding rules as a llama.cpp logits processor: the reply so far is "[1]"; what follows is forced to be
    the cited row's own name, whatever the (barely trained) model would rather write."""
    llm, tok, _ = engine
    prompt = encode_prompt(tok, with_context(QUESTIONS[0], [DOC]))
    written = tok.encode("[1]", add_special_tokens=False)
    constraint = _processors(tok, [[DOC]], len(prompt))[0]
    new = llm.complete(prompt + written, 24, constraint=constraint, stops=stop_token_ids(tok))
    text = tok.decode(written + new, skip_special_tokens=True)
    assert text.startswith("[1] Bachelor's Degree in Nursing at Test University") or text.startswith("[1] Bachelor's Degree.") \
        or text.startswith("[1] At Test University,"), text


def test_answers_are_checked_and_never_contradict_their_row(engine):
    llm, tok, _ = engine
    out = answer(llm, tok, QUESTIONS, [[DOC], [DOC]], max_new_tokens=40, expected=[[1], [1]])
    for r in out:
        assert r["grounding"]["status"] in ("verified", "no_claims")  # a contradiction is retried, then the row itself
        assert r["n_tokens"] <= 40 or r["grounding"].get("fallback")
    free = generate(llm, tok, QUESTIONS, max_new_tokens=8, grounded=False)
    assert all(r["n_tokens"] <= 8 for r in free)


def test_a_gguf_from_another_template_or_adapter_is_refused(gguf_run, tmp_path):
    run, gguf = gguf_run
    for key, said in (("template_sha256", "0" * 64), ("adapter_sha256", "f" * 64)):
        other = tmp_path / key
        shutil.copytree(gguf.parent, other)
        record = json.loads((other / "collegeadvisor-export.json").read_text()) | {key: said}
        (other / "collegeadvisor-export.json").write_text(json.dumps(record))
        with pytest.raises(ManifestError, match="another chat template" if key == "template_sha256" else "another adapter"):
            load_engine(run, "llamacpp", gguf=str(other / gguf.name))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(gguf, bare / gguf.name)
    with pytest.raises(ManifestError, match="nothing says which run"):
        load_engine(run, "llamacpp", gguf=str(bare / gguf.name))
    with pytest.raises(AdvisorError, match="export --to gguf"):
        load_engine(run, "llamacpp", gguf=str(tmp_path / "none.gguf"))


def test_serve_answers_through_the_engine(engine):
    from fastapi.testclient import TestClient

    from collegeadvisor.serve.app import create_app

    llm, tok, manifest = engine
    hits = [{"id": "r1", "document": DOC, "metadata": {}, "distance": 0.0}]
    app = create_app(llm, tok, manifest, retriever=lambda q: hits, default_max_tokens=24)
    with TestClient(app) as client:
        body = {"model": "x", "messages": QUESTIONS[0], "max_tokens": 24}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["grounding"]["status"] in ("verified", "no_claims", "unresolved")
        with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            chunks = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert s.status_code == 200 and chunks[-1] == "data: [DONE]"


def test_eval_records_the_engine(gguf_run, tmp_path):
    from collegeadvisor.eval.run import evaluate

    run, gguf = gguf_run
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("\n".join(json.dumps({"question": q[0]["content"], "answer": "", "numeric": 54321.0,
                                             "kind": "earnings", "source": {"row_id": "x"}}) for q in QUESTIONS))
    report_json, _ = evaluate(run, heldout, tmp_path / "eval", max_new_tokens=16, engine="llamacpp", gguf=str(gguf),
                              threads=2, log=lambda _: None)
    report = json.loads(report_json.read_text())
    assert report["meta"]["engine"].startswith("llamacpp (model-f32.gguf")
    with pytest.raises(AdvisorError, match="needs --engine torch"):
        evaluate(run, heldout, tmp_path / "eval2", compare=True, engine="llamacpp", gguf=str(gguf))


def test_replies_side_by_side_are_the_ones_written_alone(engine):
    """complete_many decodes greedy replies as sequences of one context, up to `parallel` in a pass, a finished
    reply's sequence taking the next prompt: each reply is the one written alone, under its own constraint, callback
    and cancel event, in fewer passes than one reply after another."""
    import threading

    llm, tok, _ = engine
    prompts = [encode_prompt(tok, with_context(QUESTIONS[i % 2], [DOC] * (1 + i % 3)))
               for i in range(llm.parallel + 2)]
    target = tok.encode(" Median debt: $23,456. Payback: 4.5 years.", add_special_tokens=False)
    constraints = [_forcing(target, len(p)) if i == 1 else None for i, p in enumerate(prompts)]
    sizes = [12 if i != 1 else len(target) for i in range(len(prompts))]
    alone = [llm.complete(p, n, constraint=c) for p, n, c in zip(prompts, sizes, constraints)]
    assert alone[1] == target
    seen, cancel = [[] for _ in prompts], [threading.Event() for _ in prompts]

    def heard(i):
        def on_token(t):
            seen[i].append(t)
            if i == 3 and len(seen[i]) == 2:
                cancel[i].set()
        return on_token

    passes, decode = [], llm.llm._ctx.decode
    llm.llm._ctx.decode = lambda batch: (passes.append(batch.n_tokens()), decode(batch))[1]
    try:
        together = llm.complete_many(prompts, max(sizes), constraints, cancels=cancel,
                                     on_tokens=[heard(i) for i in range(len(prompts))])
    finally:
        del llm.llm._ctx.decode
    for i, (a, b) in enumerate(zip(alone, together)):
        if i == 3:
            assert b == a[:2]  # cancelled after its second token
        elif i == 1:
            assert b == target  # its own constraint, not another reply's
        else:
            assert b[:12] == a
        assert seen[i] == b
    assert len(passes) < sum(len(a) for a in alone) / 2
    cached = llm.cached[0]
    assert list(llm.llm.input_ids[:llm.llm.n_tokens]) == cached  # sequence 0's record for llama-cpp-python's generate


def _loads(monkeypatch) -> list[bool]:
    """Records, for each llama.cpp model loaded from here on, whether its extra buffer types (AMX) were on."""
    import llama_cpp

    seen, init = [], llama_cpp.Llama.__init__

    def recording(self, *args, **kwargs):
        seen.append(bool(llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts))
        init(self, *args, **kwargs)
    monkeypatch.setattr(llama_cpp.Llama, "__init__", recording)
    return seen


@pytest.mark.parametrize("probe, runs", [("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", False),
                                         ("import sys, llama_cpp; sys.exit(0)", True)])
def test_the_amx_kernels_are_used_only_where_they_run(gguf_run, monkeypatch, probe, runs):
    """Stock llama.cpp's AMX matmul crashes the process on the developers' Xeons: the engine asks the build in a
    child process first, and loads without extra buffer types (AMX) where the child died."""
    from collegeadvisor import llamacpp

    _, gguf = gguf_run
    monkeypatch.setattr(llamacpp, "_has_amx", lambda: True)
    monkeypatch.setattr(llamacpp, "_PROBE", probe)
    llamacpp.amx_runs.cache_clear()
    loads = _loads(monkeypatch)
    try:
        engine = llamacpp.LlamaCpp(gguf, threads=2, parallel=1)
    finally:
        llamacpp.amx_runs.cache_clear()
    assert engine.amx is runs and loads == [runs]
    assert ("AMX" in engine.describe()) is runs


def test_the_probe_asks_that_the_amx_kernels_agree_with_the_avx512_ones(gguf_run, monkeypatch):
    """amx_runs' child: the logits of one prefill with extra buffer types (AMX) and without must be finite and close.
    The real one on the f32 export (no AMX kernels for f32 weights: the same logits), then the rule itself."""
    import llama_cpp
    import numpy as np

    from collegeadvisor import llamacpp

    _, gguf = gguf_run
    assert llamacpp._amx_agrees(str(gguf), 2)

    class Fake:
        def __init__(self, *args, **kwargs):
            self.extra = bool(llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts)

        def n_vocab(self):
            return 1000

        def eval(self, tokens):
            avx = np.random.default_rng(0).normal(0, 4, (len(tokens), 50))
            self.scores = (avx + amx_error) if self.extra else avx

        def close(self):
            pass

    monkeypatch.setattr(llama_cpp, "Llama", Fake)
    for amx_error, agrees in ((0.1, True), (1.0, False), (np.nan, False)):
        assert llamacpp._amx_agrees(str(gguf), 2) is agrees
    assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts  # the defaults are left as they were
