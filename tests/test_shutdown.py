"""Shutdown under load, as an operator does it: SIGTERM to a running ``chatd serve``.

With hundreds of sends in flight and a reply streaming, every send is
answered (an ack, or a retryable ``unavailable``) before the close, the
reply ends with a frame its clients can act on, every client is closed with
1001, and the process exits within ``[server].shutdown_grace``.
"""

from __future__ import annotations

import json
import os
import signal

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.chatd_process import start_chatd

CONNECTIONS = 8
IN_FLIGHT = 32


_TOML = (
    "[server]\nport = 0\nshutdown_grace = 5.0\n"
    "[model]\nfake_token_rate = 20.0\n"
    '[log]\nlevel = "warning"\n'
)


async def test_sigterm_answers_every_send_and_ends_every_reply(
    tmp_path, postgres, redis_server, nursery
):
    proc, url = await start_chatd(nursery, tmp_path, postgres, redis_server, _TOML)
    conv = f"sd-{os.getpid()}-{trio.current_time():.0f}"
    refs_answered: dict[int, list[dict]] = {}
    closes: dict[int, int | None] = {}
    viewer_frames: list[dict] = []
    ready = trio.Event()
    sent = 0
    all_sent = trio.Event()

    async def viewer() -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"op": "hello", "user": "viewer"}))
            await ws.send_message(json.dumps({"op": "subscribe", "conv": conv}))
            await ws.send_message(
                json.dumps(
                    {"op": "send", "conv": conv, "id": "q", "text": "#tokens=100000", "reply": True}
                )
            )
            try:
                while True:
                    frame = json.loads(await ws.get_message())
                    viewer_frames.append(frame)
                    if frame.get("type") == "delta":
                        ready.set()
            except ConnectionClosed as exc:
                closes[-1] = exc.reason.code

    async def sender(k: int) -> None:
        async with open_websocket_url(url) as ws:
            await ws.send_message(json.dumps({"op": "hello", "user": f"s{k}"}))
            for i in range(IN_FLIGHT):
                frame = {"op": "send", "conv": f"{conv}-{k}", "id": f"m{i}", "text": "x", "ref": i}
                await ws.send_message(json.dumps(frame))
            nonlocal sent
            sent += 1
            if sent == CONNECTIONS:
                all_sent.set()
            answers: list[dict] = []
            try:
                while True:
                    frame = json.loads(await ws.get_message())
                    if isinstance(frame.get("ref"), int):
                        answers.append(frame)
            except ConnectionClosed as exc:
                closes[k] = exc.reason.code
            refs_answered[k] = answers

    async with trio.open_nursery() as clients:
        clients.start_soon(viewer)
        with trio.fail_after(10):
            await ready.wait()
        for k in range(CONNECTIONS):
            clients.start_soon(sender, k)
        # SIGTERM only once every sender is connected and has written its
        # frames: a loaded machine can take longer than any fixed sleep.
        with trio.fail_after(10):
            await all_sent.wait()
        await trio.sleep(0.05)  # the sends are in flight now
        t0 = trio.current_time()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            await proc.wait()
        elapsed = trio.current_time() - t0
    assert proc.returncode == 0
    assert elapsed < 5.0 + 1.0, f"shutdown took {elapsed:.1f}s"
    for k in range(CONNECTIONS):
        answers = refs_answered[k]
        got = sorted(a["ref"] for a in answers)
        assert got == list(range(IN_FLIGHT)), (
            k,
            len(answers),
            [a for a in answers if a["type"] != "ack"][:3],
        )
        for a in answers:
            assert a["type"] == "ack" or (a["code"] == "unavailable" and a["retryable"]), a
        assert closes[k] == 1001
    ends = [f for f in viewer_frames if f.get("type") in ("stream.end", "stream.error")]
    assert [(e["type"], e.get("status")) for e in ends] == [("stream.end", "interrupted")]
    texts = [f["text"] for f in viewer_frames if f.get("type") == "delta"]
    assert ends[0]["length"] >= len("".join(texts)) > 0, "what was said is kept"
    assert closes[-1] == 1001
