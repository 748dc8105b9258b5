"""The JavaScript client (clients/js) against a real chatd on the suite's own
PostgreSQL and Redis: its Node tests (clients/js/test) run in a Node.js
process with CHATD_URL pointing here.

Node.js 20.10 or newer is needed (``./quickstart setup`` installs it when it
can); on Node 20 its WebSocket is behind ``--experimental-websocket``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from chatd.server import serve
from tests.conftest import make_config

JS = Path(__file__).resolve().parent.parent / "clients" / "js"


def _node() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("the JavaScript client's tests need Node.js >= 20.10 on PATH (node not found)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major, minor = (int(x) for x in version.stdout.strip().lstrip("v").split(".")[:2])
    if (major, minor) < (20, 10):
        pytest.fail(f"the JavaScript client's tests need Node.js >= 20.10, not {version.stdout}")
    has_ws = subprocess.run(
        [node, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], check=False
    )
    return [node] if has_ws.returncode == 0 else [node, "--experimental-websocket"]


async def test_the_javascript_client_against_a_real_chatd(nursery, postgres, redis_server):
    node = _node()
    config = make_config(
        postgres,
        redis_server,
        # Replies long and slow enough to stop one and to drop a connection mid-way.
        model={"fake_tokens": 60, "fake_token_rate": 60.0},
    )
    srv = await nursery.start(serve, config)
    # A second chatd in JWT mode (no leeway, so a token's expiry is exact).
    secret = "js-client-test-secret-0123456789abcdef"
    jwt_srv = await nursery.start(
        serve,
        make_config(postgres, redis_server, auth={"mode": "jwt", "secret": secret, "leeway": 0.0}),
    )
    env = {
        **os.environ,
        "CHATD_URL": srv.url,
        "CHATD_JWT_URL": jwt_srv.url,
        "CHATD_JWT_SECRET": secret,
    }
    with trio.fail_after(120):
        done = await trio.run_process(
            [*node, "--test", "--test-reporter=spec", str(JS / "test")],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    print(out)
    assert done.returncode == 0, f"node --test failed:\n{out}"
    assert "\N{INFORMATION SOURCE} fail 0" in out, out  # node's spec reporter
    assert "\N{INFORMATION SOURCE} pass 0" not in out, out


def test_the_javascript_client_type_checks():
    """Its JSDoc types hold under ``tsc --strict`` (TypeScript from clients/js's
    package-lock.json; ``./quickstart setup`` installs it)."""
    tsc = JS / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        pytest.fail(f"{tsc} is missing: run ./quickstart setup (it runs npm ci in clients/js)")
    _node()
    done = subprocess.run(
        ["npm", "run", "-s", "check"], cwd=JS, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"tsc found type errors:\n{done.stdout}{done.stderr}"
