"""A client :class:`~chatd.ports.Connection` in memory, for engine tests without sockets.

:func:`memory_connection_pair` returns the server side (what a session runs
on) and the client side (what a test drives). Frames to the client pass
through a channel of ``capacity`` frames: a client that stops reading fills
it, and the server's writes then block, as a full socket does.
"""

from __future__ import annotations

from typing import Any

import orjson
import trio

from chatd.ports import ConnectionGone


class MemoryConnection:
    """The server side."""

    def __init__(
        self,
        incoming: trio.MemoryReceiveChannel[str | bytes],
        outgoing: trio.MemorySendChannel[str],
        remote: str,
    ) -> None:
        self._incoming = incoming
        self._outgoing = outgoing
        self.remote = remote
        self.close_code: int | None = None
        self.close_reason = ""
        #: Set while the peer answers pings; a test clears it to play a dead peer.
        self.pongs = trio.Event()
        self.pongs.set()

    async def get_message(self) -> str | bytes:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionGone(self.close_code, self.close_reason) from None

    async def send_frames(self, frames: list[str]) -> None:
        try:
            for frame in frames:
                await self._outgoing.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionGone(self.close_code, self.close_reason) from None

    async def aclose(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._outgoing.close()
        self._incoming.close()
        await trio.lowlevel.checkpoint()

    async def abort(self) -> None:
        await self.aclose(1006, "aborted")

    async def ping(self) -> None:
        # The client side answers pings by itself unless it has stopped.
        await self.pongs.wait()

    @property
    def is_closed(self) -> bool:
        return self.close_code is not None


class MemoryClient:
    """The client side: send frames (dicts or raw text), receive decoded frames."""

    def __init__(
        self,
        outgoing: trio.MemorySendChannel[str | bytes],
        incoming: trio.MemoryReceiveChannel[str],
        server: MemoryConnection,
    ) -> None:
        self._outgoing = outgoing
        self._incoming = incoming
        self._server = server

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        data = orjson.dumps(frame).decode() if isinstance(frame, dict) else frame
        await self.send_message(data)

    async def receive(self) -> dict[str, Any]:
        """The next frame, decoded; raises ConnectionGone (with the close code) at the end."""
        return orjson.loads(await self.get_message())

    # The same calls as a trio-websocket client connection, so test clients run on either.

    async def send_message(self, data: str | bytes) -> None:
        try:
            await self._outgoing.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionGone(self._server.close_code, self._server.close_reason) from None

    async def get_message(self) -> str:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionGone(self._server.close_code, self._server.close_reason) from None

    async def aclose(self) -> None:
        """The client goes away."""
        self._outgoing.close()
        self._incoming.close()
        await trio.lowlevel.checkpoint()


def memory_connection_pair(
    capacity: int = 1000, remote: str = "memory:0"
) -> tuple[MemoryConnection, MemoryClient]:
    to_server_send, to_server_receive = trio.open_memory_channel[str | bytes](capacity)
    to_client_send, to_client_receive = trio.open_memory_channel[str](capacity)
    server = MemoryConnection(to_server_receive, to_client_send, remote)
    return server, MemoryClient(to_server_send, to_client_receive, server)
