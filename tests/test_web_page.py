"""The chat page at / (chatd/web): served with its security headers, and driven
in a real browser — headless Chromium through playwright-core
(clients/js/browser-test/page.test.mjs) — against a real chatd on the suite's
own PostgreSQL and Redis: two pages in one conversation, a streaming reply
locked to its commit, stop, a connection cut mid-reply, and Redis broken from
the operator panel. Screenshots of each step go to ``$CHATD_SCREENSHOTS``
(default: a temp directory, named in the output).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import trio

from chatd.server import serve
from tests.conftest import make_config
from tests.node import JS, node, run_node_tests

_TOKEN = "web-page-operator-token-0123456789"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("the page's browser tests need Chromium (./quickstart test installs it)")


async def test_the_page_and_its_files_are_served_with_security_headers(nursery, config):
    srv = await nursery.start(serve, config)
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=5) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY"
        assert '<script type="module" src="/web/app.js">' in page.text
        for path, ctype in [
            ("/web/app.js", "text/javascript"),
            ("/web/chatd-client.js", "text/javascript"),
            ("/web/app.css", "text/css"),
        ]:
            got = await http.get(path)
            assert got.status_code == 200 and got.headers["content-type"].startswith(ctype), path
        client = await http.get("/web/chatd-client.js")
        assert client.text == (JS / "chatd-client.js").read_text(), "the page ships the client"
        assert (await http.get("/web/nope.js")).status_code == 404


async def test_no_page_when_it_is_off(nursery, postgres, redis_server):
    srv = await nursery.start(serve, make_config(postgres, redis_server, http={"web": False}))
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=5) as http:
        assert (await http.get("/")).status_code == 404
        assert (await http.get("/healthz")).status_code == 200


async def test_the_page_in_a_real_browser(nursery, postgres, redis_server):
    node()
    chromium = _chromium()
    playwright = JS / "node_modules" / "playwright-core"
    if not playwright.exists():
        pytest.fail(f"{playwright} is missing: run ./quickstart setup (npm ci in clients/js)")
    config = make_config(
        postgres,
        redis_server,
        model={"fake_tokens": 80, "fake_token_rate": 25.0},
        chaos={"enabled": True},
        http={"operator_token": _TOKEN, "requests_per_second": 0},
    )
    srv = await nursery.start(serve, config)
    shots = os.environ.get("CHATD_SCREENSHOTS") or tempfile.mkdtemp(prefix="chatd-page-")
    env = {
        "CHATD_HTTP": srv.http_url,
        "CHATD_OPERATOR_TOKEN": _TOKEN,
        "CHROMIUM": chromium,
        "CHATD_SCREENSHOTS": shots,
    }
    out = await run_node_tests(JS / "browser-test", env, 240)
    print(f"screenshots in {shots}")
    assert "\N{INFORMATION SOURCE} pass 5" in out, out
    pngs = await trio.to_thread.run_sync(lambda: sorted(Path(shots).glob("*.png")))
    assert len(pngs) == 8, f"a screenshot of each step: {pngs}"
