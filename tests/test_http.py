"""The HTTP face: one port for WebSocket and HTTP, health, readiness, metrics, the operator API."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed, open_websocket_url

from chatd.server import serve
from tests.chatd_process import start_chatd
from tests.conftest import make_config, wait_until
from tests.faults import lose_publish

TOKEN = "operator-token-0123456789"
_DOCS = Path(__file__).resolve().parent.parent / "docs"
# Fast probes; no request budget (the tests poll /readyz and /metrics hard).
_FAST_PROBES = {"readiness_interval": 0.2, "probe_timeout": 0.5, "requests_per_second": 0.0}


def _config(postgres, redis_server, **http):
    return make_config(
        postgres,
        redis_server,
        http={"operator_token": TOKEN, **_FAST_PROBES, **http},
        chaos={"enabled": True},
    )


async def _scrape(http: httpx.AsyncClient) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def test_one_port_serves_websocket_and_http(nursery, postgres, redis_server, connect, conv):
    srv = await nursery.start(serve, _config(postgres, redis_server))
    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        r = await http.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        c = await connect(srv, "alice")  # the same host:port upgrades to WebSocket
        assert (await c.send_message(conv, "hello"))["seq"] == 1
        # HEAD, keep-alive, unknown paths and methods, bodies too large.
        await _wait_ready(http, 200, 5)  # once pub/sub is up (its first wait: 1 s)
        assert (await http.head("/readyz")).status_code == 200
        r = await http.get("/nope")
        assert r.status_code == 404 and "/healthz" in r.json()["error"]
        r = await http.post("/healthz")
        assert r.status_code == 405
        big = {"component": "redis", "pad": "x" * 70000}
        r = await http.post("/chaos/break", json=big, headers=_auth())
        assert r.status_code == 413 and "larger than" in r.json()["error"]
    # A malformed request gets hypercorn's 400; the WebSocket client is undisturbed.
    async with await trio.open_tcp_stream("127.0.0.1", srv.port) as raw:
        await raw.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        with trio.fail_after(5):
            assert (await raw.receive_some(100)).startswith(b"HTTP/1.1 400")
    assert (await c.send_message(conv, "still here"))["seq"] == 2


async def test_operator_endpoints_need_the_token(nursery, postgres, redis_server):
    srv = await nursery.start(serve, _config(postgres, redis_server))
    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        assert (await http.get("/status")).status_code == 401
        r = await http.get("/status", headers={"Authorization": "Bearer wrong-token-0123456789"})
        assert r.status_code == 401
        r = await http.get("/status", headers=_auth())
        assert r.status_code == 200 and r.json()["postgres"] == "ok"
        assert (await http.get("/metrics")).status_code == 200  # open unless metrics_auth
        metrics = await _scrape(http)
        assert metrics["chatd_refusals_total", (("code", "unauthorized"),)] == 2
    cfg = make_config(
        postgres, redis_server, http={"operator_token": TOKEN, "metrics_auth": True, **_FAST_PROBES}
    )
    srv2 = await nursery.start(serve, cfg)
    async with httpx.AsyncClient(base_url=srv2.http_url) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers=_auth())).status_code == 200
        assert (await http.get("/healthz")).status_code == 200  # health never needs it


async def test_an_operator_body_that_does_not_arrive_is_refused_in_time(
    nursery, postgres, redis_server
):
    srv = await nursery.start(serve, _config(postgres, redis_server, header_timeout=1.0))
    async with await trio.open_tcp_stream("127.0.0.1", srv.port) as raw:
        await raw.send_all(
            f"POST /chaos/break HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
        with trio.fail_after(5):
            head = await raw.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 408"), head[:80]


async def test_operator_listener_of_its_own(nursery, postgres, redis_server):
    srv = await nursery.start(serve, _config(postgres, redis_server, operator_listen="127.0.0.1:0"))
    assert srv.operator_port not in (None, srv.port)
    async with httpx.AsyncClient(base_url=srv.http_url) as public:
        assert (await public.get("/metrics")).status_code == 404
        assert (await public.get("/status", headers=_auth())).status_code == 404
        await _wait_ready(public, 200, 5)
    async with httpx.AsyncClient(base_url=srv.operator_url) as op:
        assert (await op.get("/metrics")).status_code == 200
        assert (await op.get("/status", headers=_auth())).status_code == 200


async def test_counters_move_with_the_events_they_count(
    nursery, postgres, redis_server, connect, conv
):
    srv = await nursery.start(serve, _config(postgres, redis_server))
    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        before = await _scrape(http)
        reader = await connect(srv, "reader")
        await reader.subscribe(conv)
        writer = await connect(srv, "writer")
        for i in range(3):
            await writer.send_message(conv, f"m{i}")
        await reader.messages(conv, 3)
        await writer.send_message(conv, "m0")  # the same id again: a duplicate
        after = await _scrape(http)

        def moved(name, **labels):
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0) - before.get(key, 0)

        assert moved("chatd_ops_total", op="send", result="ok") == 3
        assert moved("chatd_ops_total", op="send", result="duplicate") == 1
        assert moved("chatd_ops_total", op="subscribe", result="ok") == 1
        assert moved("chatd_ops_total", op="hello", result="ok") == 2
        assert moved("chatd_send_ack_seconds_count") == 4
        assert moved("chatd_send_ack_seconds_bucket", le="+Inf") == 4
        assert moved("chatd_messages_committed_total") == 3
        assert moved("chatd_commit_batch_size_sum") == 4  # the duplicate was a commit too
        assert after["chatd_connections", ()] == 2

        # A gap in a feed, filled from Postgres.
        await lose_publish(srv, conv, 4)
        await writer.send_message(conv, "m5")
        await reader.messages(conv, 2)
        gaps = await _scrape(http)
        assert gaps["chatd_gap_fills_total", ()] == after["chatd_gap_fills_total", ()] + 1

        # A Redis outage: publishes fail, pub/sub reconnects, the gate shows open.
        r = await http.post(
            "/chaos/break", json={"component": "redis", "seconds": 30}, headers=_auth()
        )
        assert r.status_code == 200
        await writer.send_message(conv, "during")  # acked: Postgres has it

        async def outage_seen() -> bool:
            m = await _scrape(http)
            return (
                m["chatd_relay_publish_failures_total", ()]
                > gaps["chatd_relay_publish_failures_total", ()]
                and m["chatd_pubsub_up", ()] == 0
                and m["chatd_chaos_gate_open", (("component", "redis"),)] == 1
            )

        await wait_until(outage_seen, timeout=10)
        await http.post("/chaos/heal", json={}, headers=_auth())
        got = await reader.messages(conv, 1, timeout=10)
        assert got[0]["id"] == "during"

        async def recovered() -> bool:
            m = await _scrape(http)
            return (
                m["chatd_pubsub_up", ()] == 1
                and m["chatd_pubsub_connects_total", ()] > gaps["chatd_pubsub_connects_total", ()]
                and m["chatd_outbox_rows", ()] == 0
            )

        await wait_until(recovered, timeout=10)


async def _ready(http: httpx.AsyncClient) -> tuple[int, dict]:
    r = await http.get("/readyz")
    return r.status_code, r.json()


async def _wait_ready(http: httpx.AsyncClient, want: int, bound: float) -> dict:
    """Poll /readyz until it answers ``want``; fails past ``bound`` seconds."""
    with trio.fail_after(bound):
        while True:
            status, body = await _ready(http)
            if status == want:
                return body
            await trio.sleep(0.05)


@pytest.mark.parametrize("component", ["postgres", "redis"])
async def test_readiness_follows_the_break_switch(nursery, postgres, redis_server, component):
    srv = await nursery.start(serve, _config(postgres, redis_server))
    bound = 0.2 + 0.5 + 1.0  # interval + probe timeout, and a second of slack
    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        await _wait_ready(http, 200, 5)
        srv.chaos.break_for(component, 30)
        body = await _wait_ready(http, 503, bound)
        assert any(r.startswith(component) for r in body["reasons"]), body
        assert (await http.get("/healthz")).status_code == 200  # alive, just not ready
        srv.chaos.heal()
        await _wait_ready(http, 200, 10)


@pytest.mark.parametrize("component", ["postgres", "redis"])
async def test_readiness_follows_a_real_sigstop(nursery, postgres, own_redis, component):
    srv = await nursery.start(serve, _config(postgres, own_redis))
    proc = postgres if component == "postgres" else own_redis
    bound = 0.2 + 0.5 + 1.0
    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        await _wait_ready(http, 200, 5)
        proc.pause()
        try:
            body = await _wait_ready(http, 503, bound)
            assert any(r.startswith(component) for r in body["reasons"]), body
        finally:
            proc.resume()
        await _wait_ready(http, 200, 15)


_DRAIN_TOML = (
    "[server]\nport = 0\nshutdown_grace = 4.0\ndrain_delay = 1.5\n"
    f'[http]\noperator_token = "{TOKEN}"\nreadiness_interval = 0.2\nrequests_per_second = 0.0\n'
    '[log]\nlevel = "warning"\n'
)


async def test_sigterm_fails_readiness_first_then_drains(tmp_path, postgres, redis_server, nursery):
    proc, url = await start_chatd(nursery, tmp_path, postgres, redis_server, _DRAIN_TOML)
    http_url = url.replace("ws://", "http://").rstrip("/")
    conv = f"drain-{os.getpid()}-{trio.current_time():.0f}"
    async with (
        httpx.AsyncClient(base_url=http_url) as http,
        open_websocket_url(url) as ws,
    ):
        await _wait_ready(http, 200, 10)
        await ws.send_message(json.dumps({"op": "hello", "user": "u"}))
        assert json.loads(await ws.get_message())["type"] == "welcome"
        t0 = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        body = await _wait_ready(http, 503, 1.0)
        assert body["reasons"] == ["draining: the server is shutting down"]
        # Readiness failed first: the connected client is still served meanwhile.
        for i in range(20):
            frame = {"op": "send", "conv": conv, "id": f"m{i}", "text": "x", "ref": i}
            await ws.send_message(json.dumps(frame))
        answers, close = [], None
        try:
            while True:
                frame = json.loads(await ws.get_message())
                if isinstance(frame.get("ref"), int):
                    answers.append(frame)
        except ConnectionClosed as exc:
            close = exc.reason.code
        closed_after = trio.current_time() - t0
    assert sorted(a["ref"] for a in answers) == list(range(20))
    assert all(a["type"] == "ack" for a in answers), answers[:3]
    assert close == 1001
    assert closed_after >= 1.4, "clients are served through the drain delay"
    with trio.fail_after(10):
        await proc.wait()
    elapsed = trio.current_time() - t0
    assert proc.returncode == 0
    assert elapsed < 1.5 + 4.0 + 1.0, f"shutdown took {elapsed:.1f}s"


async def test_http_connections_are_capped(nursery, postgres, redis_server, connect, conv):
    srv = await nursery.start(
        serve, make_config(postgres, redis_server, http={"max_connections": 2})
    )
    # (Within the default request budget: 20/s, 40 at once per address.)
    async with (
        httpx.AsyncClient(base_url=srv.http_url) as a,
        httpx.AsyncClient(base_url=srv.http_url) as b,
        httpx.AsyncClient(base_url=srv.http_url) as c,
    ):
        assert (await a.get("/healthz")).status_code == 200  # both kept alive
        assert (await b.get("/healthz")).status_code == 200
        r = await c.get("/healthz")
        assert r.status_code == 503 and b"too many" in r.content
    assert srv.http.refused == 1
    # WebSocket clients are not HTTP connections: they are still admitted.
    client = await connect(srv, "alice")
    assert (await client.send_message(conv, "m"))["seq"] == 1


async def test_dashboard_and_docs_name_only_metrics_that_exist(nursery, postgres, redis_server):
    """docs/grafana-dashboard.json and docs/operations.md stay true to a real scrape."""
    import re

    srv = await nursery.start(serve, _config(postgres, redis_server))
    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        text = (await http.get("/metrics")).text
    scraped = set()
    for family in text_string_to_metric_families(text):
        # Families with no sample yet (no labelled event happened) still list.
        scraped.add(f"{family.name}_total" if family.type == "counter" else family.name)
        scraped |= {s.name for s in family.samples}
    docs = _DOCS
    dashboard = (docs / "grafana-dashboard.json").read_text()
    json.loads(dashboard)  # valid JSON
    named = set(re.findall(r"\b((?:chatd|process)_[a-z_]+)\b", dashboard))
    table = (docs / "operations.md").read_text()
    named |= set(re.findall(r"^\| `(chatd_[a-z_]+)", table, re.MULTILINE))
    # A histogram is documented by its name and scraped as _bucket/_count/_sum;
    # chatd_embedded_* exist only with embedded servers (tests/test_embedded.py).
    missing = {
        n
        for n in named
        if n not in scraped
        and not {f"{n}_bucket", f"{n}_count"} <= scraped
        and not n.startswith("chatd_embedded_")
    }
    assert not missing, missing
    documented = set(re.findall(r"^\| `(chatd_[a-z_]+)", table, re.MULTILINE))
    exposed = {
        re.sub(r"_(bucket|count|sum|created)$", "", n) for n in scraped if n.startswith("chatd_")
    }
    assert exposed <= documented | {"chatd_send_ack_seconds", "chatd_commit_batch_size"}, (
        exposed - documented
    )


async def test_requests_per_address_are_budgeted(nursery, postgres, redis_server, connect, conv):
    cfg = make_config(postgres, redis_server, http={"requests_per_second": 2.0, "request_burst": 5})
    srv = await nursery.start(serve, cfg)
    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        codes = [(await http.get("/healthz")).status_code for _ in range(8)]
        assert codes == [200] * 5 + [429] * 3
        r = await http.get("/readyz")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "too many requests" in r.json()["error"]
        await trio.sleep(0.6)  # a token back at 2/s
        assert (await http.get("/healthz")).status_code == 200
    # WebSocket clients from the same address are not HTTP requests.
    client = await connect(srv, "alice")
    assert (await client.send_message(conv, "m"))["seq"] == 1
