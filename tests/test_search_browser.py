"""The search page in a real browser: Debian's chromium (installed by `make test` when missing; never
downloaded by Playwright) driven by Playwright. Type a query, see results, click one, and the video
plays from that result's start time."""

from __future__ import annotations

import os
import tempfile
import threading

import pytest

from tests.test_search import index, models, videos  # noqa: F401  (module fixtures)

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page_url(index):  # noqa: F811
    from mmvssl.search.server import make_server
    server = make_server(str(index), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_type_a_query_click_a_result_and_the_video_plays_from_its_start(page_url):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium; `make test` does it)",
                    pytrace=False)
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(page_url)
            page.fill("#q", "a red circle moves up and down")
            page.click("#go")
            page.wait_for_selector(".result")
            cards = page.query_selector_all(".result")
            assert len(cards) == 14  # every window of the four clips (k=24)
            scores = [float(c.query_selector(".score").inner_text().split()[1]) for c in cards]
            assert scores == sorted(scores, reverse=True)
            assert all(c.query_selector("img").evaluate("img => img.complete && img.naturalWidth > 0") for c in cards)
            # a result that starts later than 0 s, so playing from 0 would be caught
            card = next(c for c in cards if float(c.get_attribute("data-start")) >= 2.0)
            start, end = float(card.get_attribute("data-start")), float(card.get_attribute("data-end"))
            card.click()
            page.wait_for_function(f"() => {{ const v = document.getElementById('player');"
                                   f" return !v.paused && v.currentTime > {start} + 0.3; }}", timeout=20000)
            state = page.evaluate("() => { const v = document.getElementById('player');"
                                  " return {t: v.currentTime, paused: v.paused, src: v.src, error: v.error}; }")
            assert state["src"].endswith(card.get_attribute("data-media")) and state["error"] is None
            assert start < state["t"] < end + 1.0, (start, state)
        finally:
            browser.close()
