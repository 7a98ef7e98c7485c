"""The OpenAI-compatible server on the tiny trained run: answers equal `generate`, streaming equals batching,
bad input gets OpenAI-shaped 400s (never a 500), keys are enforced, requests are batched off the event loop,
and the official openai client works against a real uvicorn server on loopback."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from collegeadvisor.chat_format import encode_prompt, with_context
from collegeadvisor.errors import AdvisorError
from collegeadvisor.generate import answer, generate, stream_batch
from collegeadvisor.serve import bind, register, serving
from collegeadvisor.serve import app as serve_app
from collegeadvisor.serve.app import create_app, grounded_fields

QUESTION = "What do graduates of program 3 earn at school 3?"
ASK = [{"role": "user", "content": QUESTION}]
HITS = [
    {"id": "100:5138:3", "document": "Test University (OH, public): Bachelor's Degree in Nursing (CIP 5138). "
                                     "Median earnings 4 years after completion: $65,432.",
     "metadata": {"school": "Test University", "program": "Nursing", "credential": "Bachelor's Degree"}},
    {"id": "notes.md:0", "document": "Scholarships cover tuition for nursing students.",
     "metadata": {"source": "notes.md", "kind": "document"}},
]


def fake_retriever(question: str) -> list[dict]:
    assert question == QUESTION
    return HITS


@pytest.fixture(scope="module")
def served(trained_run):
    from collegeadvisor.runs import load_run

    return load_run(trained_run)


@pytest.fixture(scope="module")
def reference(served):
    """What `generate` answers, greedy: the server must give exactly this."""
    model, tok, _ = served
    return generate(model, tok, [ASK], max_new_tokens=24)[0]


@pytest.fixture
def client(served):
    with TestClient(create_app(*served, max_tokens_limit=64)) as c:
        yield c


def sse_events(lines) -> list:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def stream(client, **body) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={"messages": ASK, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(list(r.iter_lines()))


def test_completion_equals_generate(client, served, reference):
    r = client.post("/v1/chat/completions", json={"model": "anything", "messages": ASK, "max_tokens": 24})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": reference["text"]}
    assert choice["finish_reason"] == ("stop" if reference["stopped"] else "length")
    prompt = encode_prompt(served[1], ASK)
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": reference["n_tokens"],
                             "total_tokens": len(prompt) + reference["n_tokens"]}
    assert "sources" not in body


def test_finish_reason_length(client, served):
    ref = generate(served[0], served[1], [ASK], max_new_tokens=2)[0]
    assert not ref["stopped"]  # the tiny run's answers are ~19 tokens
    body = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    events = stream(client, max_tokens=2)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stream_equals_batched_answer(client, reference, served):
    events = stream(client, max_tokens=24, stream_options={"include_usage": True})
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == reference["text"]
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == ("stop" if reference["stopped"] else "length")
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == reference["n_tokens"]
    assert events[-1]["usage"]["prompt_tokens"] == len(encode_prompt(served[1], ASK))
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)


def test_stop_strings_cut_both_paths(client, reference):
    text = reference["text"]
    stop = text[6:9]
    assert len(text) > 9 and stop.strip()
    expected = text[: text.index(stop)].strip()
    body = client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 24, "stop": stop}).json()
    assert body["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": expected},
                                  "logprobs": None, "finish_reason": "stop"}
    events = stream(client, max_tokens=24, stop=[stop])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


BAD = {
    "no messages": ({"model": "x"}, "messages"),
    "empty messages": ({"messages": []}, "messages"),
    "bad role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    "content not text": ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
    "messages not a list": ({"messages": "hello"}, "messages"),
    "max_tokens zero": ({"messages": ASK, "max_tokens": 0}, "max_tokens"),
    "max_tokens over limit": ({"messages": ASK, "max_tokens": 65}, "max_tokens"),
    "temperature text": ({"messages": ASK, "temperature": "hot"}, "temperature"),
    "temperature too high": ({"messages": ASK, "temperature": 3}, "temperature"),
    "several choices": ({"messages": ASK, "n": 2}, "n"),
    "too many stops": ({"messages": ASK, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "ends with assistant": ({"messages": ASK + [{"role": "assistant", "content": "x"}]}, "messages"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "x"}, *ASK]}, "messages"),
    "body is a list": ([1, 2], None),
}


@pytest.mark.parametrize("body,param", BAD.values(), ids=BAD.keys())
@pytest.mark.parametrize("streaming", [False, True], ids=["batch", "stream"])
def test_bad_input_is_openai_400(client, body, param, streaming):
    if streaming and isinstance(body, dict):
        body = {**body, "stream": True}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_broken_json_and_unknown_route(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_prompt_over_limit(served):
    with TestClient(create_app(*served, max_prompt_tokens=10)) as c:
        r = c.post("/v1/chat/completions", json={"messages": ASK})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "at most 10" in err["message"]
    context = served[0].config.max_position_embeddings
    with TestClient(create_app(*served, max_tokens_limit=4 * context)) as c:
        r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": context})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "max_tokens"


def test_api_key(served):
    with TestClient(create_app(*served, api_key="s3cret")) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models").status_code == 401
        # a key check comes before body validation: no key, bad body -> 401, not 400
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 401
        ok = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2},
                    headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_models_health_and_page(client, trained_run):
    assert client.get("/v1/models").json()["data"][0]["id"] == trained_run.name
    assert client.get("/health").json() == {"status": "ok", "model": trained_run.name, "rag": False}
    page = client.get("/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text and "getReader" in page.text


def test_rag_answers_carry_sources(served):
    model, tok, _ = served
    with TestClient(create_app(*served, retriever=fake_retriever)) as c:
        body = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 8}).json()
        events = stream(c, max_tokens=8)
    grounded = with_context(ASK, [h["document"] for h in HITS])
    assert body["usage"]["prompt_tokens"] == len(encode_prompt(tok, grounded))  # the passages went in
    expected = answer(model, tok, [ASK], [[h["document"] for h in HITS]], max_new_tokens=8)[0]
    assert body["choices"][0]["message"]["content"] == expected["text"]
    # the question names no school or program the data resolves: its rows may not be the ones meant
    assert body["grounding"]["status"] == expected["grounding"]["status"].replace("verified", "unresolved")
    assert body["resolution"]["decision"] == "retrieval"
    assert body["grounding"]["fallback"] == bool(expected["grounding"].get("fallback"))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == expected["text"]
    assert events[-1]["grounding"] == body["grounding"]
    assert body["sources"] == [
        {"id": "100:5138:3", "school": "Test University", "program": "Nursing", "credential": "Bachelor's Degree",
         "snippet": HITS[0]["document"]},
        {"id": "notes.md:0", "school": "notes.md", "program": None, "credential": None, "snippet": HITS[1]["document"]},
    ]
    assert events[-1]["sources"] == body["sources"]
    assert all("sources" not in e for e in events[:-1])


def test_cancel_stops_generation(served):
    model, tok, _ = served
    cancel = threading.Event()
    pieces = []

    def emit(piece):
        pieces.append(piece)
        cancel.set()

    info = stream_batch(model, tok, [ASK], 200, 0.0, 1.0, [cancel], [emit])[0]
    assert info["n_tokens"] <= 2 and not info["stopped"] and pieces


def test_concurrent_requests_are_batched_off_the_event_loop(served, monkeypatch, reference):
    sizes = []

    def slow_answer(*args, **kwargs):
        sizes.append(len(args[2]))
        time.sleep(0.6)
        return answer(*args, **kwargs)

    monkeypatch.setattr(serve_app, "answer", slow_answer)
    app = create_app(*served, batch_wait_ms=50)
    results, health_s = [None] * 4, []
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        def ask(i):
            results[i] = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 24}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)  # the batch is generating now
        t0 = time.perf_counter()
        assert http.get("/health").status_code == 200
        health_s.append(time.perf_counter() - t0)
        for t in threads:
            t.join(30)
    assert sum(sizes) == 4 and max(sizes) > 1, sizes  # one generate call served several requests
    assert health_s[0] < 0.4  # the event loop answered while the model worked
    assert [r["choices"][0]["message"]["content"] for r in results] == [reference["text"]] * 4


def test_concurrent_streams_share_one_batch_and_each_equals_generate(served, monkeypatch):
    """Streams of different prompts (so left padding differs) that arrive together run as one batched generate;
    each client gets its own reply, the same text `generate` gives for its prompt alone."""
    model, tok, _ = served
    asks = [ASK, [{"role": "user", "content": "Is program 5 at school 5 worth it compared to high school?"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Median debt at school 2?"}]]
    expected = [generate(model, tok, [a], max_new_tokens=24)[0] for a in asks]
    assert len({e["text"] for e in expected}) > 1
    sizes, real = [], serve_app.stream_batch

    def counted(*args, **kwargs):
        sizes.append(len(args[2]))
        time.sleep(0.3)  # let the others queue up behind the first
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_app, "stream_batch", counted)
    app = create_app(*served, batch_wait_ms=100)
    texts, finals = [None] * len(asks), [None] * len(asks)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        def ask(i):
            body = {"messages": asks[i], "max_tokens": 24, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                events = sse_events(list(r.iter_lines()))
            texts[i] = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
            finals[i] = events[-1]["choices"][0]["finish_reason"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sum(sizes) == len(asks) and max(sizes) > 1, sizes
    assert texts == [e["text"] for e in expected]
    assert finals == ["stop" if e["stopped"] else "length" for e in expected]


def test_taken_port_is_one_clear_error(trained_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(AdvisorError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind("127.0.0.1", port)
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["serve", "--run", str(trained_run), "--port", str(port)])
        t0 = time.perf_counter()
        with pytest.raises(AdvisorError, match="already in use"):
            args.func(args)
        assert time.perf_counter() - t0 < 2  # refused before loading the model


def test_openai_client_against_real_server(served, reference):
    openai = pytest.importorskip("openai")
    app = create_app(*served, retriever=fake_retriever, api_key="k-123")
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k-123", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == [served[2]["run_dir"].rsplit("/", 1)[-1]]
        resp = client.chat.completions.create(model="advisor", messages=ASK, max_tokens=8)
        expected = answer(served[0], served[1], [ASK], [[h["document"] for h in HITS]], max_new_tokens=8)[0]
        assert resp.choices[0].message.content == expected["text"]
        assert resp.choices[0].finish_reason == ("stop" if expected["stopped"] else "length")
        assert resp.usage.completion_tokens == expected["n_tokens"]
        assert [s["id"] for s in resp.model_extra["sources"]] == [h["id"] for h in HITS]

        chunks = list(client.chat.completions.create(model="advisor", messages=ASK, max_tokens=8, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected["text"]
        assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason
        assert [s["id"] for s in chunks[-1].model_extra["sources"]] == [h["id"] for h in HITS]
        assert chunks[-1].model_extra["grounding"]["status"] == resp.model_extra["grounding"]["status"]

        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="advisor", messages=ASK)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="advisor", messages=[{"role": "robot", "content": "x"}])


def test_overlapping_stop_strings_cut_at_the_earliest_in_both_paths():
    from collegeadvisor.generate import cut_at_stop

    assert cut_at_stop("abcd", ["c", "bc"]) == 1  # "bc" starts first, whatever the list's order
    assert cut_at_stop("abcd", ["x", ""]) is None


def test_an_answer_replaced_for_leaving_out_what_was_asked_says_so():
    verdict = {"status": "verified", "cited": [1], "problems": [], "fallback": True,
               "left_out": "the verdict (Yes, No or Unknown)"}
    fields = grounded_fields(HITS, verdict)["grounding"]
    assert fields["fallback"] and fields["left_out"] == "the verdict (Yes, No or Unknown)"
    assert "left_out" not in grounded_fields(HITS, verdict | {"left_out": None})["grounding"]
