"""The web page: routes and facts (fast), and the page end to end in headless Chromium (slow).

The browser tests drive Debian's `chromium` through Playwright's Python package with
`executable_path`, never a downloaded browser; they skip, saying why, where /usr/bin/chromium
or playwright is missing (CI installs both). Screenshots are written under pytest's tmp dir
and, when GLASSFORGE_ARTIFACTS is set, into that folder too.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from glassforge.serve import web
from helpers import LiveServer, glassforge_serve, wait_until

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ------------------------------------------------------------------------------------ helpers


def serve_release(engine, api_key: str | None = None, verify: bool = True) -> tuple[LiveServer, dict]:
    """The server `glassforge serve` runs, with the page mounted on it."""
    from glassforge.serve.app import create_app

    app = create_app(engine, api_key=api_key)
    facts = web.mount(app, engine.folder, {"model": app.state.server.model_name, "auth_required": bool(api_key),
                                           "max_context": engine.max_context}, verify=verify)
    return LiveServer(app), facts


def wait_for_js(page, expression: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript expression until it is truthy (page.wait_for_function evaluates strings, which the
    page's Content-Security-Policy rightly forbids; page.evaluate goes through the debugger and is allowed)."""
    wait_until(lambda: page.evaluate(expression), timeout, f"timed out waiting for: {expression}", interval=0.05)


def save_artifact(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    where = os.environ.get("GLASSFORGE_ARTIFACTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(where) / name)
    return path


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run the "
                    "browser tests; .ci/run does")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                 "(pip install -c constraints.txt playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.errors = errors
    pg.set_default_timeout(30_000)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


# ------------------------------------------------------------------------------------ fast


def test_static_files_are_shipped_and_offline():
    for name in web.STATIC_FILES:
        text = (web.STATIC_DIR / name).read_text(encoding="utf-8")
        # No CDN, no web font, no remote anything: the page must work offline.
        for needle in ("http://", "https://", "//cdn", "@import"):
            assert needle not in text, f"static/{name} refers to {needle}"
    html = (web.STATIC_DIR / "index.html").read_text()
    # Every form control has a label.
    for control in ("temperature", "max-tokens", "min-span", "api-key", "message", "trace-text"):
        assert f'<label for="{control}">' in html and f'id="{control}"' in html


def test_public_paths():
    assert web.is_public_path("/")
    assert web.is_public_path("/static/app.js") and web.is_public_path("/static/style.css")
    assert not web.is_public_path("/static/../web.py")
    assert not web.is_public_path("/facts") and not web.is_public_path("/v1/chat/completions")


DATA_SUMMARY = {
    "sources": [{"name": "pystdlib", "kind": "pystdlib", "license": "PSF-2.0", "weight": 1.0, "seen": 1200,
                 "kept": 1100, "train": 1000, "val": 100, "bytes_kept": 2345678, "tokens_kept": 456789},
                {"name": "notes", "kind": "local", "license": "CC0-1.0", "weight": 0.5, "seen": 3, "kept": 3,
                 "train": 3, "val": 0, "bytes_kept": 999, "tokens_kept": None}],
    "documents_seen": 1203, "documents_kept": 1103, "train_documents": 1003, "val_documents": 100,
    "bytes_seen": 2500000, "bytes_kept": 2346677, "dropped": {"too_short": 100}, "reasons": {"too_short": "..."},
    "order_entries": 2006, "merkle": {"mix": "ab" * 32, "sources": {"pystdlib": "cd" * 32}},
    "order_sha256": "ef" * 32, "tokenizer_sha256": "01" * 32,
}


def test_facts_come_from_data_summary_and_eval_json(random_model, tmp_path):
    """The data panel is data_summary.json (columns in the data card's order, a summary sentence from the
    counts); the evaluation rows are eval.json's through evaluate's results_rows, and without an eval.json
    there are none."""
    from glassforge.core.runfolder import Release, Run
    from glassforge.evaluate.stage import results_rows

    run = Run(tmp_path / "run")
    shutil.copytree(random_model, run.release, ignore=shutil.ignore_patterns("_tokenizer"))
    Release(run.release).data_summary.write_text(json.dumps(DATA_SUMMARY))
    facts = web.collect_facts(run.release, verify=False)
    table = facts["data"]["sources_table"]
    assert table["columns"] == ["source", "kind", "licence", "weight", "seen", "kept", "train", "val",
                                "bytes kept", "tokens kept"]
    assert table["rows"][0] == {"source": "pystdlib", "kind": "pystdlib", "licence": "PSF-2.0", "weight": "1",
                                "seen": "1,200", "kept": "1,100", "train": "1,000", "val": "100",
                                "bytes kept": "2,345,678", "tokens kept": "456,789"}
    assert table["rows"][1]["weight"] == "0.5" and table["rows"][1]["tokens kept"] == "n/a"
    assert facts["data"]["summary"] == ("Kept 1,103 of 1,203 documents (1,003 training, 100 validation; "
                                        "2,346,677 of 2,500,000 bytes).")
    assert facts["data"]["mix_merkle_root"] == "ab" * 32 and facts["data"]["order_sha256"] == "ef" * 32
    assert facts["eval"] == {"source": None, "rows": [], "decontamination": {}}

    results = {"tasks": {"val-loss": {"pystdlib": {"loss": 2.5, "bpb": 1.25}},
                         "docmatch": {"n": 40, "accuracy": 0.5}},
               "decontamination": {"removed": {"docmatch": 2}}}
    Release(run.release).eval_results.write_text(json.dumps(results))  # the release carries its eval.json
    facts = web.collect_facts(run.release, verify=False)
    assert facts["eval"] == {"source": "eval.json", "rows": results_rows(results),
                             "decontamination": {"docmatch": 2}}
    assert facts["eval"]["rows"]

    # a release with neither data_summary.json nor eval.json: no table, no rows, no guesses
    alone = web.collect_facts(random_model, verify=False)
    assert "sources_table" not in alone["data"] and "summary" not in alone["data"] and alone["eval"]["rows"] == []


def test_the_page_needs_no_key_but_facts_and_the_api_do(random_model):
    """With an API key, the server's own key check (not a patched one) lets the page and its two files through
    and nothing else: /facts and the API answer 401 without the key and 200 with it."""
    from fastapi.testclient import TestClient

    from glassforge.serve.app import create_app
    from glassforge.serve.engine import Engine

    engine = Engine(random_model, max_batch=2, compile_decode=False)
    try:
        app = create_app(engine, api_key="sesame")
        web.mount(app, random_model, {"model": "random", "auth_required": True}, verify=False)
        with TestClient(app, base_url="http://localhost") as client:
            for path in ("/", "/static/app.js", "/static/style.css"):
                assert client.get(path).status_code == 200, path
            for path in ("/facts", "/v1/models", "/metrics", "/static/index.htm"):
                assert client.get(path).status_code == 401, path
            key = {"Authorization": "Bearer sesame"}
            assert client.get("/facts", headers=key).json()["auth_required"] is True
            assert client.get("/v1/models", headers=key).status_code == 200
    finally:
        engine.close()


def test_routes_on_a_folder_without_release_files(random_model):
    """A bare model folder (no manifest, no attestation) still gets a page; its facts say the check failed."""
    from fastapi.testclient import TestClient

    from glassforge.serve.app import create_app
    from glassforge.serve.engine import Engine

    engine = Engine(random_model, max_batch=2, compile_decode=False)
    try:
        app = create_app(engine)
        facts = web.mount(app, random_model, {"model": "random"})
        with TestClient(app, base_url="http://localhost") as client:
            r = client.get("/")
            assert r.status_code == 200 and "text/html" in r.headers["content-type"]
            assert r.headers["content-security-policy"] == web.CSP
            # the same policy on every HTML answer, the page's file as much as the page
            r = client.get("/static/index.html")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            assert r.headers["content-security-policy"] == web.CSP and r.headers["x-content-type-options"] == "nosniff"
            assert '<script src="/static/app.js"' in r.text
            assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
            assert client.get("/static/style.css").status_code == 200
            assert client.get("/static/web.py").status_code == 404
            got = client.get("/facts").json()
        assert got == json.loads(json.dumps(facts))
        assert got["model"] == "random" and got["trace_available"] is False
        v = got["verification"]
        assert v["passed"] is False and v["failed"][0]["reason"] == "manifest.json is missing"
        assert got["config"]["hidden_size"] == 64
    finally:
        engine.close()


@pytest.mark.slow
def test_facts_of_a_real_release(tiny_run):
    facts = web.collect_facts(tiny_run)
    v = facts["verification"]
    assert v["passed"], v["failed"]
    assert v["total"] >= 5 and all(c["ok"] for c in v["claims"])
    assert facts["recipe"]["name"] == "tiny" and facts["recipe"]["model"]["d_model"] == 96
    assert facts["eval"]["rows"] and facts["eval"]["source"] == "eval.json"
    assert facts["training"]["pretrain"]["steps"] == 60 and "sft" in facts["training"]
    assert facts["loss_curves"] and facts["loss_curves"][0]["src"].startswith("data:image/png;base64,")
    assert facts["data"]["sources_table"]["rows"] and facts["data"]["summary"].startswith("Kept ")
    assert facts["attestation"]["weights_sha256"]
    assert facts["trace_available"] == (tiny_run / "release" / "trace" / "index.json").is_file()


@pytest.mark.slow
def test_facts_report_a_changed_file(tiny_run, tmp_path):
    release = tmp_path / "release"
    shutil.copytree(tiny_run / "release", release)
    (release / "generation_config.json").write_text("{}\n")
    from glassforge.release.verify import check_summary

    v = check_summary(release)
    assert v["not_checked"]["replay"].endswith("--replay all")  # what a start-up check leaves to the user
    assert not v["passed"]
    assert any(f["name"] == "file generation_config.json" and "changed" in f["reason"] for f in v["failed"])


def test_mount_twice_merges_facts(random_model):
    from fastapi import FastAPI

    app = FastAPI()
    first = web.mount(app, random_model, {"model": "a"}, verify=False)
    again = web.mount(app, random_model, {"auth_required": True})
    assert again is first and first["model"] == "a" and first["auth_required"] is True
    assert [r.path for r in app.routes].count("/") == 1


@pytest.mark.slow
def test_glassforge_serve_serves_the_page(tiny_run):
    """`glassforge serve` itself: the page, its files and /facts, with the API key guarding /facts only."""
    with glassforge_serve(tiny_run, env={"GLASSFORGE_API_KEY": "sesame"}) as root:
        page = httpx.get(root + "/")
        assert page.status_code == 200 and "/static/app.js" in page.text
        assert httpx.get(root + "/static/app.js").status_code == 200
        assert httpx.get(root + "/facts").status_code == 401
        facts = httpx.get(root + "/facts", headers={"Authorization": "Bearer sesame"}).json()
        assert facts["verification"]["passed"] and facts["auth_required"] is True


# ------------------------------------------------------------------------------------ browser


def _training_excerpt(run: Path) -> tuple[str, str]:
    """(document id, a passage of it) from a training document, to trace through the page."""
    from glassforge.core.runfolder import Run
    from glassforge.data.documents import iter_documents

    for doc in iter_documents(Run.open(run), "train"):
        text = doc["text"]
        if len(text) >= 400:
            start = text.find("\n", 100) + 1 or 100
            return doc["id"], text[start:start + 220]
    raise AssertionError("no training document of 400 characters or more")


@pytest.mark.slow
def test_page_end_to_end(tiny_run, page, tmp_path):
    """Ask a question, watch the answer stream in, open its trace, trace a training passage, read the facts."""
    from glassforge.serve.engine import Engine

    engine = Engine(tiny_run, max_batch=4, compile_decode=False)
    srv, facts = serve_release(engine)
    try:
        assert facts["verification"]["passed"], facts["verification"]["failed"]
        page.goto(srv.root + "/")
        page.wait_for_selector("#verify-badge.ok")
        badge = page.inner_text("#verify-badge")
        assert "check out" in badge and "replay not run" in badge  # what was checked, and what was not
        # Model facts: recipe, evaluation table, loss curves (loaded images).
        facts_panel = page.locator("#facts")
        assert facts_panel.is_visible()
        assert "tiny" in facts_panel.inner_text() and "Evaluation" in facts_panel.inner_text()
        assert page.locator("#facts table").count() >= 3
        wait_for_js(page, "[...document.querySelectorAll('#facts img')].length > 0 && "
                         "[...document.querySelectorAll('#facts img')].every(i => i.complete && i.naturalWidth > 0)")

        # Keyboard only: focus is in the message box; type and press Enter.
        # The page's default temperature (0.7): greedy, the tiny model answers only newlines. The page
        # sends no seed; the test adds one to its request so the sampled answer is the same every run.
        assert page.input_value("#temperature") == "0.7"

        def seeded(route, request):
            body = json.loads(request.post_data)
            route.continue_(post_data=json.dumps({**body, "seed": 1}))

        page.route("**/v1/chat/completions", seeded)
        page.fill("#max-tokens", "48")
        page.focus("#message")
        page.keyboard.type("What does json.dumps do?")
        page.keyboard.press("Enter")
        answer = page.locator("li.message.assistant").last
        page.wait_for_selector("li.message.assistant[data-state=done], li.message.assistant[data-state=error]")
        assert answer.get_attribute("data-state") == "done", answer.inner_text()
        text = answer.locator(".content").inner_text()
        assert text.strip(), "the answer is empty"
        assert int(answer.get_attribute("data-chunks")) >= 2, "the answer did not arrive as a stream of deltas"
        assert page.locator("#stop").is_disabled() and page.locator("#send").is_enabled()

        # The conversation is kept in the browser.
        saved = page.evaluate("JSON.parse(localStorage.getItem('glassforge.chat.v1'))")
        assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
        assert saved["messages"][1]["content"] == answer.locator(".content").text_content()

        # The answer's trace: highlighted spans, or a clear "no span found".
        answer.locator(".trace-button").click()
        result = answer.locator(".trace-result")
        result.locator(".traced, .no-span, .error").first.wait_for()
        assert result.locator(".error").count() == 0, result.inner_text()
        if result.locator(".no-span").count():
            assert "No span found" in result.inner_text()
        # Down to one-token spans, some of the answer's words surely occur in training: they highlight.
        page.fill("#min-span", "1")
        answer.locator(".trace-button").click()
        # A span of newlines only renders as nothing to click; take the first visible one.
        result.locator(".traced .span:visible").first.wait_for()
        result.locator(".traced .span:visible").first.click()
        result.locator("li.doc").first.wait_for()
        assert " of at least 1 token occur" in result.locator(".trace-summary").inner_text()
        page.fill("#min-span", "8")
        save_artifact(page, tmp_path, "web-chat.png")

        # Trace a passage copied from a training document: it must highlight, and list that document.
        doc_id, passage = _training_excerpt(tiny_run)
        page.fill("#trace-text", passage)
        page.click("#trace-submit")
        box = page.locator("#trace-any-result")
        box.locator(".span").first.wait_for()
        assert "span" in box.locator(".trace-summary").inner_text()
        first = box.locator(".span").first
        first.focus()
        page.keyboard.press("Enter")  # spans are buttons: the keyboard opens them too
        assert first.get_attribute("aria-pressed") == "true"
        box.locator("li.doc").first.wait_for()
        docs = box.locator("li.doc")
        listed = box.locator(".span-docs").inner_text()
        assert doc_id in listed or "showing" in listed, listed
        meta = docs.first.locator(".meta").inner_text()
        assert "licence PSF-2.0" in meta and "sha256" in meta
        assert docs.first.locator(".snippet mark").inner_text().strip()
        save_artifact(page, tmp_path, "web-trace.png")
        page.set_viewport_size({"width": 1280, "height": 2400})  # the whole facts panel, curves included
        save_artifact(page, tmp_path, "web-facts.png")
        page.set_viewport_size({"width": 1280, "height": 900})

        # A reload keeps the conversation.
        page.reload()
        page.wait_for_selector("li.message.assistant")
        assert page.locator("li.message").count() == 2
        page.click("#new-chat")
        assert page.locator("li.message").count() == 0
    finally:
        srv.stop()
        engine.close()


@pytest.mark.slow
def test_report_renders_with_plots(tiny_run, page, tmp_path):
    from glassforge.tools.report import write_report

    out = write_report(tiny_run, tmp_path / "report.html")
    text = out.read_text()
    # Self-contained: no script, and nothing loaded from anywhere (URLs may appear as text, e.g. in-toto types).
    assert "<script" not in text and "<link" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    page.goto(out.as_uri())
    for heading in ("Training", "Data", "Evaluation", "Attestation"):
        assert page.locator(f"h2:text-is('{heading}')").count() == 1
    wait_for_js(page, "[...document.images].every(i => i.complete)")
    sizes = page.evaluate("[...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight])")
    alts = [a for a, _, _ in sizes]
    assert all(w > 0 and h > 0 for _, w, h in sizes), sizes
    for stage in ("Pretraining", "Chat fine-tuning"):
        for what in ("loss", "learning rate", "throughput"):
            assert f"{stage} {what} against training step" in alts, alts
    assert "All" in page.locator("#attestation ~ p.ok").first.inner_text()
    assert page.locator("table").count() >= 4
    save_artifact(page, tmp_path, "report.png")


def test_stop_button_ends_a_stream(random_model, page):
    """A slow fake stream behind the real page: the Stop button aborts it and the server sees the disconnect."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()
    seen = {"cancelled": False, "body": None}

    @app.post("/v1/chat/completions")
    async def slow(body: dict):
        seen["body"] = body

        async def events():
            try:
                yield 'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
                for i in range(200):
                    yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}) + "\n\n"
                    await asyncio.sleep(0.05)
                yield "data: [DONE]\n\n"
            except asyncio.CancelledError:
                seen["cancelled"] = True
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    web.mount(app, random_model, {"model": "fake"}, verify=False)
    srv = LiveServer(app)
    try:
        page.goto(srv.root + "/")
        page.fill("#message", "Count slowly")
        page.click("#send")
        wait_for_js(page, "Number(document.querySelector('li.assistant').dataset.chunks) >= 3")
        assert page.locator("#stop").is_enabled()
        page.keyboard.press("Escape")
        page.wait_for_selector("li.assistant[data-state=stopped]")
        content = page.locator("li.assistant .content").inner_text()
        assert content.startswith("w0 w1 w2") and "w199" not in content
        assert "Stopped" in page.locator("li.assistant .note").inner_text()
        assert seen["body"]["stream"] is True and seen["body"]["max_tokens"] >= 1
        wait_until(lambda: seen["cancelled"], 5, "the server kept streaming after Stop", interval=0.05)
    finally:
        srv.stop()


def test_api_key_field(random_model, page):
    """With --api-key the page asks for the key, keeps it in the browser and sends it as a Bearer token."""
    from glassforge.serve.engine import Engine

    engine = Engine(random_model, max_batch=2, compile_decode=False)
    srv, _ = serve_release(engine, api_key="sesame", verify=False)
    try:
        assert httpx.get(srv.root + "/facts").status_code == 401
        page.goto(srv.root + "/")
        key = page.locator("#api-key")
        key.wait_for()
        assert page.locator("#key-field").is_visible()
        assert "API key" in page.inner_text("#status")
        key.fill("sesame")
        key.press("Tab")  # a change event saves it
        page.wait_for_selector("#facts-body h3")
        assert page.evaluate("localStorage.getItem('glassforge.apiKey')") == "sesame"
        page.fill("#max-tokens", "8")
        page.fill("#message", "Hello")
        page.click("#send")
        page.wait_for_selector("li.assistant[data-state=done]")
    finally:
        srv.stop()
        engine.close()
