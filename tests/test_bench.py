"""Smoke runs of every `chatd bench` subcommand at a tiny size, so the harness keeps working.

Each starts its own embedded PostgreSQL and Redis in a temp dir, as a user would.
The numbers are not asserted (speed is proved by the benchmarks, not by tests);
the correctness checks the benchmarks make (gaps, duplicates) are.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys

import pytest
import trio

from chatd.bench.common import file_variants, variants


async def _bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    proc = await trio.run_process(
        [sys.executable, "-m", "chatd.cli", "bench", *args, "--json", str(out)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("CHATD_")},
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"machine:" in proc.stdout
    return json.loads(out.read_text())


async def test_bench_load_and_reads(tmp_path):
    r = await _bench(tmp_path, "load", "--events", "3k")
    assert r["events"] >= 3000 and r["messages_total"] > 0
    png = tmp_path / "reads.png"
    r = await _bench(tmp_path, "reads", "--sizes", "1k,3k", "--samples", "10", "--plot", str(png))
    assert [s["events"] >= n for s, n in zip(r["sizes"], (1000, 3000), strict=True)] == [True, True]
    assert all(s["chatd_snapshot_p50_ms"] > 0 for s in r["sizes"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:4] == b"\x89PNG"
    else:  # plots are an optional extra: chatd[bench]
        assert not png.exists()


async def test_bench_reconnect_storm_has_no_gaps(tmp_path):
    # One process, then two sharing the port: the storm lands on both, and the
    # live tail reaches every client through Redis.
    r = await _bench(
        tmp_path, "reconnect", "--clients", "30", "--streams", "2", "--missed", "5",
        "--workers", "1,2",
    )  # fmt: skip
    assert set(r["by_workers"]) == {"1", "2"}
    for storm in r["by_workers"].values():
        assert storm["caught_up"] == 30
        assert storm["gaps_or_order_problems"] == 0 and storm["duplicates"] == 0
        # Every client's snapshot came after its connection opened.
        assert 0 < storm["open_p50_s"] <= storm["snapshot_p50_s"] <= storm["all_caught_up_s"]
        assert storm["ratio_to_bare"] > 0
    # The raw limit (the bare WebSocket server, same storm) was measured too.
    assert 0 < r["bare"]["p50_s"] <= r["bare"]["all_answered_s"]


async def test_bench_sends_and_stream(tmp_path):
    # As a user runs them (one configuration), and the stream with 2 workers.
    r = await _bench(
        tmp_path, "sends", "--seconds", "1", "--senders", "2", "--convs", "2", "--viewers", "1"
    )
    assert r["full"]["acked"] > 0 and r["full"]["errors"] == 0
    r = await _bench(tmp_path, "stream", "--streams", "3", "--seconds", "1", "--workers", "2")
    assert r["by_workers"]["2"]["token_deliveries"] > 0
    assert r["by_workers"]["2"]["offset_gaps"] == 0


async def test_bench_bridge_measures_each_bridge_against_plain_asyncio(tmp_path):
    r = await _bench(tmp_path, "bridge", "--calls", "400")
    assert r["raw"]["redis_ping_us"] > 0 and r["raw"]["pg_select_us"] > 0
    for kind in ("trio-asyncio", "thread"):
        for key in ("empty_us", "empty_concurrent_us", "redis_ping_us", "pg_select_us"):
            assert r[kind][key] > 0, (kind, key)


async def test_bench_sends_and_stream_on_both_asyncio_bridges(tmp_path):
    # With test_bench_sends_and_stream: sends on 1 and 2 workers, the stream
    # on 2 and 1, each bridge on one worker count or the other.
    bridges = ("--bridge", "thread,trio-asyncio")
    r = await _bench(
        tmp_path, "sends", "--seconds", "1", "--senders", "2", "--convs", "2", "--viewers", "1",
        "--workers", "2", *bridges,
    )  # fmt: skip
    for kind in ("thread", "trio-asyncio"):
        full = r["by_bridge"][kind]["full"]
        assert full["acked"] > 0 and full["errors"] == 0 and full["deliveries"] > 0, (kind, full)
    r = await _bench(tmp_path, "stream", "--streams", "3", "--seconds", "1", *bridges)
    for kind in ("thread", "trio-asyncio"):
        assert r["by_bridge"][kind]["token_deliveries"] > 0, kind
        assert r["by_bridge"][kind]["offset_gaps"] == 0, kind


def test_bench_variants_are_labelled_by_what_varies():
    def measured(workers: str, bridge: str) -> tuple[list[str], list[str]]:
        args = argparse.Namespace(workers=workers, bridge=bridge)
        labels = variants(args)
        results: dict = {}
        file_variants(results, args, {label: {"n": i} for i, (label, _) in enumerate(labels)})
        return [label for label, _ in labels], sorted(results)

    assert measured("1", "") == (["1"], ["n"])
    assert measured("1,2", "") == (["1", "2"], ["by_workers"])
    assert measured("2", "thread,trio-asyncio") == (["thread", "trio-asyncio"], ["by_bridge"])
    both = measured("1,2", "thread,trio-asyncio")
    assert both == (
        ["1w thread", "2w thread", "1w trio-asyncio", "2w trio-asyncio"],
        ["by_variant"],
    )
    assert variants(argparse.Namespace(workers="2", bridge="thread"))[0][1] == {
        "workers": 2,
        "asyncio_bridge": "thread",
    }


async def test_bench_storm(tmp_path):
    r = await _bench(tmp_path, "storm", "--clients", "5", "--subs", "4")
    (run,) = r["runs"]
    assert run["kinds"] == {"snapshot": 20} and run["clients_failed"] == 0, run
    assert run["rss_peak_mb"] >= run["rss_rest_mb"] > 0


async def test_bench_idle(tmp_path):
    r = await _bench(tmp_path, "idle", "--clients", "5", "--seconds", "1")
    assert r["clients"] == 5 and r["server_cpu"] >= 0


def test_bench_wire_frames_decode_as_websocket():
    """The bench's lean client frames exactly as RFC 6455 says (checked by wsproto)."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import CloseConnection, TextMessage

    from chatd.bench.wire import frame

    server = Connection(ConnectionType.SERVER)
    texts = ["", "hi", "é" * 70, "x" * 126, "y" * 70_000]
    for t in texts:
        server.receive_data(frame(0x1, t.encode()))
    server.receive_data(frame(0x8, (1000).to_bytes(2, "big")))
    events = list(server.events())
    got = [e.data for e in events if isinstance(e, TextMessage)]
    assert "".join(got) == "".join(texts)
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1000


@pytest.mark.parametrize("answer", [b"HTTP/1.1 400 Bad Request\r\n\r\n", None])
async def test_bench_wire_client_closes_its_socket_when_the_handshake_fails(answer):
    """Refused, or no answer before the caller's deadline: the client's socket is closed."""
    from chatd.bench.wire import WireClient, WireError

    saw_eof = trio.Event()

    async def server(stream):
        await stream.receive_some(4096)
        if answer is not None:
            await stream.send_all(answer)
        with trio.fail_after(5):
            while await stream.receive_some(4096):
                pass
        saw_eof.set()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        expected = WireError if answer is not None else trio.TooSlowError
        with pytest.raises(expected), trio.fail_after(0.3):
            await WireClient.connect(f"ws://127.0.0.1:{port}/")
        with trio.fail_after(5):
            await saw_eof.wait()
        nursery.cancel_scope.cancel()


async def test_bench_auth_and_abuse(tmp_path):
    r = await _bench(
        tmp_path, "auth", "--seconds", "1", "--clients", "4", "--senders", "2", "--convs", "2",
        "--viewers", "1", "--window", "8",
    )  # fmt: skip
    assert {h["errors"] for h in r["handshakes"].values()} == {0}
    assert all(h["handshakes"] > 0 for h in r["handshakes"].values())
    assert all(s["acked"] > 0 and s["errors"] == 0 for s in r["sends"].values())
    r = await _bench(tmp_path, "abuse", "--seconds", "1", "--abusers", "2")
    phases = r["phases"]
    assert phases["quiet"]["abuser_sent"] == 0 and phases["quiet"]["pings"] > 0
    assert phases["poison"]["abuser_refused"] == phases["poison"]["abuser_sent"] > 0
    assert phases["send flood"]["abuser_refused"] > 0, "the send rate limit refused some"
    assert phases["connection flood"]["abuser_refused"] > 0, "the per-address cap refused some"


async def test_bench_survive(tmp_path):
    r = await _bench(
        tmp_path, "survive", "--modes", "transient,100", "--kills", "1", "--replies", "2",
        "--lease", "1", "--takeover-interval", "0.3", "--kill-after", "0.5,1",
        "--cost-replies", "2", "--cost-seconds", "1",
    )  # fmt: skip
    transient, checkpoint = r["modes"]
    for mode in (transient, checkpoint):
        for case in ("redis_intact", "redis_lost"):
            s = mode[case]
            assert s["samples"] == 2 and s["not_ended"] == s["not_committed"] == 0, s
            assert s["inconsistent"] == 0 and s["statuses"] == ["interrupted"], s
            assert s["kill_to_end_p99_s"] < 10, s
        assert mode["cost"]["tokens"] > 0
    # Redis kept the partial: nothing a watcher saw was lost, in either mode.
    assert transient["redis_intact"]["lost_chars_max"] == 0
    assert checkpoint["redis_intact"]["lost_chars_max"] == 0
    # Redis lost too: transient keeps nothing; checkpoints keep all but the last interval.
    assert transient["redis_lost"]["lost_chars_p50"] > 0
    assert checkpoint["redis_lost"]["lost_tokens_max"] < transient["redis_lost"]["lost_tokens_max"]
    assert checkpoint["cost"]["busy"]["wal"] > transient["cost"]["busy"]["wal"]


async def test_bench_durable(tmp_path):
    r = await _bench(tmp_path, "durable", "--seconds", "0.5", "--writers", "2", "--pairs", "1")
    for server in ("chatd", "reference_file", "reference_memory"):
        assert r[server]["appends_per_s"] > 0 and r[server]["producer_appends_per_s"] > 0
        assert r[server]["sse"]["samples"] > 0 and r[server]["long-poll"]["samples"] > 0
