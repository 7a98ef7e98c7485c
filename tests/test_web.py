"""The web chat page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright) against a real
uvicorn server with the tiny trained run: streamed answers, multi-turn history, sources, the API-key prompt."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from collegeadvisor.generate import answer
from collegeadvisor.serve import serving
from collegeadvisor.serve.app import create_app

CHROMIUM = os.environ.get("COLLEGEADVISOR_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path("/tmp/collegeadvisor-web.png")
HITS = [
    {"id": "100:5138:3", "document": "Test University (OH, public): Bachelor's Degree in Nursing. "
                                     "Median earnings 4 years after completion: $65,432.",
     "metadata": {"school": "Test University", "program": "Nursing", "credential": "Bachelor's Degree"}},
    {"id": "200:5202:3", "document": "Other College (CA, private): Bachelor's Degree in Business.",
     "metadata": {"school": "Other College", "program": "Business", "credential": "Bachelor's Degree"}},
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def served(trained_run):
    from collegeadvisor.runs import load_run

    return load_run(trained_run)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it (apt-get install -y chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def expected(served, messages) -> str:
    model, tok, _ = served
    return answer(model, tok, [messages], [[h["document"] for h in HITS]], max_new_tokens=MAX_TOKENS)[0]["text"]


def ask(page, question: str, n: int):
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_function(
        f"document.querySelectorAll(\".msg.assistant[data-done='true']\").length >= {n}"
        " || document.querySelector('.msg.error') !== null", timeout=30_000)
    assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").inner_text()
    return page.locator(".msg.assistant").nth(n - 1)


def test_chat_page_streams_answers_with_sources(served, browser):
    asked = []
    app = create_app(*served, retriever=lambda q: asked.append(q) or HITS, default_max_tokens=MAX_TOKENS)
    with serving(app) as url:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model').textContent.length > 0")
        assert served[2]["run_dir"].endswith(page.inner_text("#model").split(" ")[0])
        page.evaluate("""() => { window.updates = 0;
            new MutationObserver((records) => window.updates += records.length).observe(document.getElementById('log'),
                {subtree: true, childList: true, characterData: true}); }""")

        q1 = "What do graduates of program 3 earn at school 3?"
        first = ask(page, q1, 1)
        history = [{"role": "user", "content": q1}]
        a1 = expected(served, history)
        assert first.locator(".text").inner_text() == a1
        assert page.evaluate("window.updates") > 4  # the answer arrived in pieces, not at once
        sources = first.locator(".sources li")
        assert sources.count() == 2
        assert "Test University: Bachelor's Degree in Nursing" in sources.nth(0).inner_text()
        assert "$65,432" in sources.nth(0).inner_text()
        assert first.locator(".verdict").get_attribute("data-status") in (
            "verified", "no_claims", "fallback", "left_out", "unresolved")

        q2 = "And what is the median debt there?"
        second = ask(page, q2, 2)
        history += [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
        assert second.locator(".text").inner_text() == expected(served, history)  # the page sent the history
        assert asked == [q1, q2]
        assert page.locator(".msg.user .text").all_inner_texts() == [q1, q2]
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        page.click("#reset")
        assert page.locator(".msg").count() == 0
        page.close()
    assert SCREENSHOT.stat().st_size > 10_000


def test_chat_page_asks_for_the_api_key(served, browser):
    app = create_app(*served, api_key="k-web", default_max_tokens=8)
    with serving(app) as url:
        page = browser.new_page()
        page.goto(url + "/")
        assert not page.is_visible("#apikey")
        page.fill("#question", "What do graduates of program 3 earn at school 3?")
        page.press("#question", "Enter")
        page.wait_for_selector(".msg.error", timeout=30_000)
        assert "API key" in page.inner_text(".msg.error")
        assert page.is_visible("#apikey")
        page.fill("#apikey", "k-web")
        answer = ask(page, "What do graduates of program 3 earn at school 3?", 1)
        assert answer.get_attribute("data-finish") in ("stop", "length")
        page.close()


def test_chat_page_marks_an_unverified_answer_and_its_cited_row(served, browser, monkeypatch):
    import collegeadvisor.serve.app as serve_app

    def unverified(model, tok, conversations, passages, *args, **kwargs):
        return [{"text": "[1] Median earnings: $99,999.", "stopped": True, "n_tokens": 9,
                 "grounding": {"status": "unverified", "cited": [1], "fallback": False,
                               "problems": ["states $99,999, which is not row [1]'s median earnings ($65,432)"]}}
                for _ in conversations]

    monkeypatch.setattr(serve_app, "answer", unverified)
    app = create_app(*served, retriever=lambda q: HITS, default_max_tokens=MAX_TOKENS)
    with serving(app) as url:
        page = browser.new_page()
        page.goto(url + "/")
        reply = ask(page, "What do graduates of program 3 earn at school 3?", 1)
        badge = reply.locator(".verdict")
        assert badge.get_attribute("data-status") == "unverified" and "Not verified" in badge.inner_text()
        assert "$65,432" in badge.get_attribute("title")
        assert reply.locator(".sources li").nth(0).get_attribute("class") == "cited"
        assert reply.locator(".sources li").nth(1).get_attribute("class") != "cited"
        page.close()
