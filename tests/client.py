"""A small WebSocket test client speaking protocol v1."""

from __future__ import annotations

import json
from typing import Any

import trio
from trio_websocket import ConnectionClosed, connect_websocket_url

from chatd.ports import ConnectionGone

_STREAM_FRAMES = ("stream.start", "delta", "stream.end", "stream.error")


class Client:
    """Over a trio-websocket client connection, or a MemoryClient (same calls)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        #: Every frame received, in order.
        self.frames: list[dict[str, Any]] = []
        self._unread: list[dict[str, Any]] = []
        self._ref = 0

    @classmethod
    async def open(
        cls, nursery: trio.Nursery, url: str, connect_timeout: float = 10.0, **kw: Any
    ) -> Client:
        # trio-websocket 0.12 waits forever for the opening handshake when the
        # server dies mid-handshake (its reader ends without waking the
        # connector): the deadline turns that into TooSlowError.
        with trio.fail_after(connect_timeout):
            ws = await connect_websocket_url(nursery, url, **kw)
        return cls(ws)

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float | None = 5.0) -> dict[str, Any]:
        """The next frame; ``None``: no deadline of its own (a caller's covers it,
        or a reader that waits as long as the connection lives)."""
        if timeout is None:
            frame = json.loads(await self.ws.get_message())
        else:
            with trio.fail_after(timeout):
                frame = json.loads(await self.ws.get_message())
        self.frames.append(frame)
        return frame

    async def expect(self, type_: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """The next frame of ``type_`` matching ``match``; other frames stay unread."""
        for i, frame in enumerate(self._unread):
            if frame.get("type") == type_ and all(frame.get(k) == v for k, v in match.items()):
                return self._unread.pop(i)
        with trio.fail_after(timeout):
            while True:
                frame = await self.recv(timeout=None)
                if frame.get("type") == type_ and all(frame.get(k) == v for k, v in match.items()):
                    return frame
                self._unread.append(frame)

    async def request(
        self, frame: dict[str, Any], reply: str, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Send ``frame`` with a fresh ref and wait for the reply (or error) carrying it."""
        self._ref += 1
        ref = f"r{self._ref}"
        await self.send({**frame, "ref": ref})
        with trio.fail_after(timeout):
            while True:
                for i, f in enumerate(self._unread):
                    if f.get("ref") == ref:
                        return self._unread.pop(i)
                f = await self.recv(timeout=None)
                if f.get("ref") == ref:
                    return f
                self._unread.append(f)

    async def hello(self, user: str) -> dict[str, Any]:
        reply = await self.request({"op": "hello", "user": user}, "welcome")
        assert reply["type"] == "welcome", reply
        return reply

    async def subscribe(self, conv: str, after: int | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"op": "subscribe", "conv": conv}
        if after is not None:
            frame["after"] = after
        reply = await self.request(frame, "snapshot")
        assert reply["type"] == "snapshot", reply
        return reply

    async def send_message(self, conv: str, id_: str, text: str = "hi") -> dict[str, Any]:
        return await self.request({"op": "send", "conv": conv, "id": id_, "text": text}, "ack")

    async def send_reply(self, conv: str, id_: str, text: str = "hi") -> dict[str, Any]:
        """Send a message asking for an assistant reply; returns the ack (with ``stream``)."""
        ack = await self.request(
            {"op": "send", "conv": conv, "id": id_, "text": text, "reply": True}, "ack"
        )
        assert ack["type"] == "ack" and "stream" in ack, ack
        return ack

    async def follow(
        self, conv: str, stream: str, have: str = "", timeout: float = 10.0
    ) -> tuple[str, dict[str, Any]]:
        """Read a reply's deltas until it ends; returns (assembled text, end frame).

        Asserts every delta starts exactly where the text so far ends.
        """
        text = have
        with trio.fail_after(timeout):
            while True:
                f = await self._next_stream_frame(conv, stream, timeout)
                if f["type"] == "delta":
                    assert f["offset"] == len(text), (f, len(text))
                    text += f["text"]
                elif f["type"] in ("stream.end", "stream.error"):
                    return text, f

    async def _next_stream_frame(self, conv: str, stream: str, timeout: float) -> dict[str, Any]:
        for i, f in enumerate(self._unread):
            if f.get("stream") == stream and f.get("type") in _STREAM_FRAMES:
                return self._unread.pop(i)
        while True:
            f = await self.recv(timeout=timeout)
            if f.get("stream") == stream and f.get("type") in _STREAM_FRAMES:
                return f
            self._unread.append(f)

    async def messages(self, conv: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Collect ``count`` live message events for ``conv``."""
        out = []
        with trio.fail_after(timeout):
            while len(out) < count:
                out.append(await self.expect("message", timeout=timeout, conv=conv))
        return out

    async def closed_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; return its close code."""
        with trio.fail_after(timeout):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                return exc.reason.code
            except ConnectionGone as exc:
                return exc.code

    async def close(self) -> None:
        with trio.move_on_after(2):
            await self.ws.aclose()
