"""Durable Streams over HTTP on a real chatd (its own PostgreSQL and Redis).

The official conformance suite (``conformance/``, pinned in its
package-lock.json) runs against chatd; the other tests prove what the suite
cannot see: live readers woken across processes by chatd's fan-out (never by
polling), readers that survive a Redis outage, and access by token grants.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from chatd.chaos import Chaos
from chatd.server import serve
from chatd.tokens import mint
from tests.conftest import make_config
from tests.node import node

CONFORMANCE = Path(__file__).resolve().parent.parent / "conformance"
#: Tests the suite runs by default (0.3.6); the 6 subscription tests are optional.
SUITE_TESTS = 332


def _config(postgres, redis_server, **durable):
    return make_config(
        postgres,
        redis_server,
        http={"requests_per_second": 0, "max_connections": 1024},
        durable={"long_poll_timeout": 0.5, **durable},
    )


async def test_the_official_conformance_suite_passes(nursery, postgres, redis_server, tmp_path):
    node()
    vitest = CONFORMANCE / "node_modules" / ".bin" / "vitest"
    if not vitest.exists():
        pytest.fail(f"{vitest} is missing: run ./quickstart setup (npm ci in conformance/)")
    srv = await nursery.start(serve, _config(postgres, redis_server))
    results = tmp_path / "results.json"
    with trio.fail_after(300):
        done = await trio.run_process(
            [str(vitest), "run", "--reporter=json", f"--outputFile={results}"],
            cwd=CONFORMANCE,
            env={**os.environ, "DS_BASE_URL": srv.http_url, "DS_LONG_POLL_MS": "20000"},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    report = json.loads(results.read_text())
    failed = {
        t["fullName"]: [m[:600] for m in t.get("failureMessages", [])]
        for f in report["testResults"]
        for t in f["assertionResults"]
        if t["status"] == "failed"
    }
    assert not failed, f"conformance tests failed: {failed}\n{done.stderr.decode()[-3000:]}"
    assert report["numPassedTests"] == SUITE_TESTS, report["numPassedTests"]


async def _long_poll(http: httpx.AsyncClient, path: str, at: str) -> httpx.Response:
    return await http.get(path, params={"offset": at, "live": "long-poll"})


async def test_a_connection_serves_its_next_request_after_a_long_read(
    nursery, postgres, redis_server
):
    """A long-poll outlasting [http].header_timeout still ends at its own timeout,
    and the keep-alive connection it used serves the next request at once.

    hypercorn's read timeout (which chatd once set to header_timeout) stopped
    reading such a connection mid-response: the long-poll ended early, and the
    client's next request on the connection was never read (reset later).
    """
    cfg = make_config(
        postgres,
        redis_server,
        http={"requests_per_second": 0, "header_timeout": 1.0, "keep_alive": 30.0},
        durable={"long_poll_timeout": 2.5},
    )
    srv = await nursery.start(serve, cfg)
    path = "/v1/stream/long-read-then-more"
    async with httpx.AsyncClient(
        base_url=srv.http_url, timeout=10, limits=httpx.Limits(max_connections=1)
    ) as http:
        r = await http.put(path, headers={"Content-Type": "text/plain"}, content=b"x")
        tail = r.headers["Stream-Next-Offset"]
        t0 = trio.current_time()
        r = await _long_poll(http, path, tail)
        waited = trio.current_time() - t0
        assert r.status_code == 204 and waited >= 2.4, (r.status_code, waited)
        # The same connection (one allowed), answered at once.
        with trio.fail_after(2):
            r = await http.get(path, params={"offset": "-1"})
        assert r.status_code == 200 and r.text == "x"


async def test_a_body_that_does_not_arrive_is_refused_in_time(nursery, postgres, redis_server):
    """With no read timeout in hypercorn, a body's deadline is the app's:
    [http].header_timeout for the whole body, then 408."""
    cfg = make_config(
        postgres, redis_server, http={"requests_per_second": 0, "header_timeout": 1.0}
    )
    srv = await nursery.start(serve, cfg)
    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        await http.put("/v1/stream/slow-body", headers={"Content-Type": "text/plain"})
    host, port = srv.http_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            b"POST /v1/stream/slow-body HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\n\r\nabc"
        )
        with trio.fail_after(5):
            head = await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 408"), head[:80]


async def test_a_long_poll_is_woken_by_an_append_in_another_process(
    nursery, postgres, redis_server
):
    # A long timeout: an answer with data well before it came from a wake.
    cfg = _config(postgres, redis_server, long_poll_timeout=60.0)
    a = await nursery.start(serve, cfg)
    b = await nursery.start(serve, cfg)
    path = "/v1/stream/wake-across"
    async with (
        httpx.AsyncClient(base_url=a.http_url, timeout=90) as ha,
        httpx.AsyncClient(base_url=b.http_url, timeout=90) as hb,
    ):
        r = await ha.put(path, headers={"Content-Type": "text/plain"})
        tail = r.headers["Stream-Next-Offset"]
        got: list[httpx.Response] = []

        async def reader() -> None:
            got.append(await _long_poll(hb, path, tail))

        for round_ in range(3):
            got.clear()
            async with trio.open_nursery() as n:
                n.start_soon(reader)
                await trio.sleep(0.5)  # the reader waits on B
                with trio.fail_after(10):
                    await ha.post(
                        path, content=f"r{round_}", headers={"Content-Type": "text/plain"}
                    )
                    while not got:
                        await trio.sleep(0.01)
            assert got[0].status_code == 200 and got[0].text == f"r{round_}"
            tail = got[0].headers["Stream-Next-Offset"]
        # The metrics count it: A's appends and the wakes it sent, B's wakes received.
        scraped = {}
        for name, http in (("a", ha), ("b", hb)):
            text = (await http.get("/metrics")).text
            scraped[name] = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
        assert scraped["a"][("chatd_durable_appends_total", ())] >= 3
        assert scraped["a"][("chatd_durable_wakes_total", (("kind", "sent"),))] >= 3
        assert scraped["b"][("chatd_durable_wakes_total", (("kind", "received"),))] >= 3
    assert b.engine.streams is not None and b.engine.streams.wakes_received >= 3


async def test_readers_catch_up_after_a_redis_outage(nursery, postgres, redis_server):
    cfg = _config(postgres, redis_server, long_poll_timeout=60.0)
    chaos_b = Chaos()
    a = await nursery.start(serve, cfg)
    b = await nursery.start(partial_serve(cfg, chaos_b))
    path = "/v1/stream/after-outage"
    async with (
        httpx.AsyncClient(base_url=a.http_url, timeout=90) as ha,
        httpx.AsyncClient(base_url=b.http_url, timeout=90) as hb,
    ):
        r = await ha.put(path, headers={"Content-Type": "text/plain"})
        tail = r.headers["Stream-Next-Offset"]
        got: list[httpx.Response] = []

        async def reader() -> None:
            got.append(await _long_poll(hb, path, tail))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.5)
            # B's Redis goes away: the wake the append publishes never reaches it.
            chaos_b.break_for("redis", 3.0)
            await trio.sleep(0.5)
            r = await ha.post(path, content=b"during", headers={"Content-Type": "text/plain"})
            assert r.status_code == 204  # durable in Postgres: Redis is not needed to append
            with trio.fail_after(20):  # healed after 3 s; the timeout is 60 s
                while not got:
                    await trio.sleep(0.05)
        assert got[0].status_code == 200 and got[0].text == "during"


def partial_serve(cfg, chaos):
    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await serve(cfg, chaos=chaos, task_status=task_status)

    return run


async def test_access_needs_a_token_granting_the_stream(nursery, postgres, redis_server):
    secret = "durable-streams-test-secret-0123456789"
    cfg = make_config(postgres, redis_server, auth={"mode": "jwt", "secret": secret})
    srv = await nursery.start(serve, cfg)

    def bearer(**streams: str) -> dict[str, str]:
        token = mint(
            cfg.auth, "agent", streams={k.replace("_", "/"): v for k, v in streams.items()}
        )
        return {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}

    async with httpx.AsyncClient(base_url=srv.http_url) as http:
        path = "/v1/stream/team/notes"
        r = await http.put(path, headers={"Content-Type": "text/plain"})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]
        r = await http.put(path, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert (await http.put(path, headers=bearer(other_x="rw"))).status_code == 403
        assert (await http.put(path, headers=bearer(team_="r"))).status_code == 403
        writer = bearer(**{"team_*": "rw"})
        assert (await http.put(path, headers=writer)).status_code == 201
        assert (await http.post(path, content=b"hi", headers=writer)).status_code == 204
        reader = bearer(team_notes="r")
        r = await http.get(path, headers=reader)
        assert r.status_code == 200 and r.text == "hi"
        assert (await http.post(path, content=b"no", headers=reader)).status_code == 403
        assert (await http.delete(path, headers=reader)).status_code == 403
        # A fork needs read access to its source too.
        fork = {**bearer(mine_="rw"), "Stream-Forked-From": path}
        assert (await http.put("/v1/stream/mine/copy", headers=fork)).status_code == 403
        # A conversation's stream: read access as on the WebSocket (token grants).
        conv_token = mint(cfg.auth, "bob", convs={"room-*": "r"})
        ok = {"Authorization": f"Bearer {conv_token}"}
        assert (await http.get("/v1/conversations/room-1", headers=ok)).status_code == 200
        assert (await http.get("/v1/conversations/other", headers=ok)).status_code == 403
        assert (await http.get("/v1/conversations/room-1")).status_code == 401


async def test_a_conversation_reads_as_a_json_stream_with_offsets_following_seqs(
    nursery, postgres, redis_server
):
    from tests.client import Client

    srv = await nursery.start(serve, _config(postgres, redis_server, long_poll_timeout=30.0))
    conv = "ds-conv-1"
    url = f"/v1/conversations/{conv}"
    ws = await Client.open(nursery, srv.url)
    await ws.hello("alice")
    await ws.subscribe(conv)
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=60) as http:
        r = await http.get(url)  # nobody wrote yet: an empty JSON stream at offset 0
        assert r.status_code == 200 and r.json() == [] and r.headers["Stream-Up-To-Date"]
        start = r.headers["Stream-Next-Offset"]
        for i in range(3):
            await ws.send_message(conv, f"m{i}", f"text {i}")
        seen = await ws.messages(conv, 3)
        r = await http.get(url, params={"offset": start})
        # Exactly the events WebSocket subscribers got, in order.
        assert r.json() == seen and [m["seq"] for m in r.json()] == [1, 2, 3]
        tail = (await http.get(url, params={"offset": "-1"})).headers["Stream-Next-Offset"]
        assert (await http.head(url)).headers["Stream-Next-Offset"] == tail == offset_of(3)
        # Resume from the offset after message 2: message 3 alone.
        r = await http.get(url, params={"offset": offset_of(2)})
        assert [m["seq"] for m in r.json()] == [3]
        # A long-poll at the tail is woken by the next send (the timeout is 30 s).
        got: list[httpx.Response] = []

        async def poll() -> None:
            got.append(await http.get(url, params={"offset": tail, "live": "long-poll"}))

        async with trio.open_nursery() as n:
            n.start_soon(poll)
            await trio.sleep(0.5)
            await ws.send_message(conv, "m3", "woken")
            with trio.fail_after(10):
                while not got:
                    await trio.sleep(0.02)
        assert got[0].status_code == 200 and [m["id"] for m in got[0].json()] == ["m3"]
        # SSE from the start: every message, then live ones, as the WebSocket saw them.
        events: list[dict] = []
        async with http.stream("GET", url, params={"offset": "-1", "live": "sse"}) as sse:
            data_lines: list[str] = []
            async for line in sse.aiter_lines():
                if line.startswith("data:"):
                    data_lines.append(line[5:])
                elif not line and data_lines:
                    payload = json.loads("\n".join(data_lines))
                    data_lines = []
                    if isinstance(payload, list):
                        events += payload
                        if len(events) == 4:
                            await ws.send_message(conv, "m4", "live over sse")
                        if len(events) == 5:
                            break
        ws_all = await ws.messages(conv, 2)
        assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]
        assert events[3:] == ws_all
        # Read-only, and only conversation ids.
        assert (await http.post(url, content=b"{}")).status_code == 405
        assert (await http.get("/v1/conversations/bad%20id")).status_code == 404


def offset_of(pos: int) -> str:
    from chatd.durable.model import offset

    return offset(pos)


@pytest.mark.parametrize("live", ["sse", "long-poll"])
async def test_the_official_client_follows_a_conversation_across_a_restart(
    nursery, postgres, redis_server, live
):
    """@durable-streams/client follows /v1/conversations/<conv> on chatd A; A stops,
    messages are sent through chatd B meanwhile, A starts again on the same port:
    the client resumes from its offset by itself, every message once, in order."""
    from tests.client import Client

    node()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg_a = _config(postgres, redis_server, long_poll_timeout=2.0)
    cfg_a = replace(cfg_a, server=replace(cfg_a.server, port=port))
    conv = f"follow-{live}"

    async def serve_a(task_status=trio.TASK_STATUS_IGNORED):
        await serve(cfg_a, task_status=task_status)

    a = await nursery.start(serve_a)
    b = await nursery.start(serve, _config(postgres, redis_server))
    writer = await Client.open(nursery, b.url)
    await writer.hello("writer")
    lines: list[dict] = []
    proc = await trio.lowlevel.open_process(
        [*node(), str(CONFORMANCE / "follow-conversation.mjs")],
        env={
            **os.environ,
            "DS_URL": f"{a.http_url}/v1/conversations/{conv}",
            "DS_WANT": "9",
            "DS_LIVE": live,
            "DS_DEBUG": "1",
        },
        stdout=subprocess.PIPE,
    )

    async def read_lines() -> None:
        buf = b""
        assert proc.stdout is not None
        async for chunk in proc.stdout:
            buf += chunk
            *done, buf = buf.split(b"\n")
            for x in done:
                if x.startswith(b"{"):
                    lines.append(json.loads(x))
                else:
                    print("client:", x.decode(errors="replace"))

    async def until(count: int) -> None:
        with trio.move_on_after(30):
            while len(lines) < count:
                await trio.sleep(0.05)
        assert len(lines) >= count, f"the client saw {lines}, waiting for {count}"

    async with trio.open_nursery() as n:
        n.start_soon(read_lines)
        for i in range(3):
            await writer.send_message(conv, f"before-{i}")
        await until(3)
        a.shutdown()  # chatd A stops (as on SIGTERM); the client retries
        await trio.sleep(2.0)
        for i in range(3):
            await writer.send_message(conv, f"while-down-{i}")
        await trio.sleep(1.0)
        await nursery.start(serve_a)  # the same port again
        for i in range(3):
            await writer.send_message(conv, f"after-{i}")
        await until(9)
        with trio.fail_after(10):
            await proc.wait()
    assert [x["seq"] for x in lines] == list(range(1, 10))
    assert [x["id"] for x in lines][3:6] == [f"while-down-{i}" for i in range(3)]
    assert proc.returncode == 0


async def test_an_sse_reader_that_stops_reading_is_cut_and_others_are_undisturbed(
    nursery, postgres, redis_server
):
    cfg = _config(postgres, redis_server, long_poll_timeout=5.0)
    cfg = replace(cfg, limits=replace(cfg.limits, write_timeout=1.0))
    srv = await nursery.start(serve, cfg)
    streams = srv.engine.streams
    assert streams is not None
    path = "/v1/stream/big"
    chunk = b"x" * 60_000
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as http:
        await http.put(path, headers={"Content-Type": "text/plain"})
        for _ in range(150):  # 9 MB: more than the socket buffers hold
            await http.post(path, content=chunk, headers={"Content-Type": "text/plain"})

        # A reader that asks for all of it over SSE and never reads a byte.
        sock = trio.socket.socket()
        # A small receive window: the server's writes block after a few MB.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", srv.port))
        stalled = trio.SocketStream(sock)
        await stalled.send_all(
            f"GET {path}?offset=-1&live=sse HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        # Meanwhile a bystander appends and reads as usual.
        latencies = []
        for i in range(20):
            t0 = trio.current_time()
            await http.post(path + "-side", content=b"x", headers={"Content-Type": "text/plain"})
            if i == 0:
                await http.put(path + "-side", headers={"Content-Type": "text/plain"})
            await http.get(path + "-side")
            latencies.append(trio.current_time() - t0)
            await trio.sleep(0.1)
        # The stalled reader was cut within the write deadline, and let go of.
        with trio.fail_after(10):
            while streams.live_readers:
                await trio.sleep(0.05)
        assert max(latencies) < 1.0, latencies
    await stalled.aclose()
