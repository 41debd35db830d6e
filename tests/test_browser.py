"""A real browser against a real server: headless Debian Chromium (driven by Playwright, never a downloaded
browser) loads the web UI, streams a completion into the page, and stops a long one with the Stop button."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from gpt.model_dir import load
from gpt.serve.app import create_app
from gpt.serve.config import ServeConfig
from tests.conftest import live_server

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "the cat saw"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = create_app(load(tiny_model_dir, name="tiny"), ServeConfig(max_tokens=100_000))
    with live_server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def page(server):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: run `sudo make system-deps` (installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(server[0] + "/")
        yield page
        browser.close()


def test_page_streams_a_completion(page, server):
    url, _ = server
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.fill("#prompt", PROMPT)
    page.fill("#max_tokens", "24")
    page.fill("#temperature", "0")
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)
    shown = page.inner_text("#completion")
    api = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                     "top_p": 0.95}).json()
    assert shown == api["choices"][0]["text"] and shown
    assert "tokens/s" in page.inner_text("#status")
    assert page.inner_text("#output").startswith(PROMPT)


def test_stop_button_stops_the_generation(page, server):
    _, app = server
    cancelled = app.state.stats["cancelled"]
    page.fill("#prompt", PROMPT)
    page.fill("#max_tokens", "60000")
    page.fill("#temperature", "0")  # the tiny model's greedy loop never reaches EOS, so only Stop can end it
    page.click("#generate")
    page.wait_for_function("document.getElementById('completion').textContent.length > 20", timeout=30_000)
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')", timeout=10_000)
    deadline = time.time() + 10
    while time.time() < deadline and (app.state.worker.busy.is_set() or app.state.stats["cancelled"] == cancelled):
        time.sleep(0.05)
    assert app.state.stats["cancelled"] == cancelled + 1  # the server stopped generating, not just the page
    assert not app.state.worker.busy.is_set()
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")
