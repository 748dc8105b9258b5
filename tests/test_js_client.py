"""The JavaScript client (clients/js) against a real chatd on the suite's own
PostgreSQL and Redis: its Node tests (clients/js/test) run in a Node.js
process with CHATD_URL pointing here.

Node.js 20.10 or newer is needed (``./quickstart setup`` installs it when it
can); on Node 20 its WebSocket is behind ``--experimental-websocket``.
"""

from __future__ import annotations

import subprocess

import pytest

from chatd.server import serve
from tests.conftest import make_config
from tests.node import JS, node, run_node_tests


async def test_the_javascript_client_against_a_real_chatd(nursery, postgres, redis_server):
    node()
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
    env = {"CHATD_URL": srv.url, "CHATD_JWT_URL": jwt_srv.url, "CHATD_JWT_SECRET": secret}
    await run_node_tests(JS / "test", env, 120)


def test_the_javascript_client_type_checks():
    """Its JSDoc types hold under ``tsc --strict`` (TypeScript from clients/js's
    package-lock.json; ``./quickstart setup`` installs it)."""
    tsc = JS / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        pytest.fail(f"{tsc} is missing: run ./quickstart setup (it runs npm ci in clients/js)")
    node()
    done = subprocess.run(
        ["npm", "run", "-s", "check"], cwd=JS, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"tsc found type errors:\n{done.stdout}{done.stderr}"
