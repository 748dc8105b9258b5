"""A lean WebSocket client for load generation (RFC 6455, text frames only).

The load generator shares the machine's cores with chatd, Postgres and Redis.
A full WebSocket library spends more CPU per frame than the server it
measures (trio-websocket + wsproto: a task hop per message, pure-Python
masking); that CPU is taken from the system under test. This client frames
and parses in a few lines, masks with a fresh random key per frame (``int``
XOR, done in C), writes every frame it has ready in one socket send, and
returns every complete frame a socket read brought.

Not a general client: no extensions, no binary messages; server pings are
answered, anything else unexpected raises :class:`WireError`.
"""

from __future__ import annotations

import base64
import os
import struct
from urllib.parse import urlsplit

import trio

_MAX_HEADER = 16 * 1024
_CONNECT_TIMEOUT = 10.0


class WireError(Exception):
    """The server said something this client does not handle."""


def _mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class WireClient:
    """One WebSocket connection: :meth:`send` many frames, :meth:`receive` many."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self._pongs: list[bytes] = []
        self.closed: tuple[int, str] | None = None

    @classmethod
    async def connect(cls, url: str) -> WireClient:
        """Open a connection and complete the opening handshake."""
        u = urlsplit(url)
        if u.scheme != "ws" or not u.hostname:
            raise WireError(f"only ws:// URLs are supported, not {url!r}")
        deadline = trio.current_time() + _CONNECT_TIMEOUT
        with trio.fail_at(deadline):
            stream = await trio.open_tcp_stream(u.hostname, u.port or 80)
        client = cls(stream)
        try:
            with trio.fail_at(deadline):
                await client._handshake(u.path or "/", u.netloc)
        except BaseException:
            # Refused, timed out, or cancelled by the caller: the socket is not left open.
            await trio.aclose_forcefully(stream)
            raise
        return client

    async def _handshake(self, path: str, host: str) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        await self._stream.send_all(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self._buf:
            data = await self._stream.receive_some(65536)
            if not data or len(self._buf) > _MAX_HEADER:
                raise WireError("handshake: no complete response from the server")
            self._buf += data
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise WireError(f"handshake refused: {head.splitlines()[0]!r}")
        self._buf = bytearray(rest)

    async def send(self, texts: list[bytes]) -> None:
        """Send each of ``texts`` (UTF-8 JSON) as a text message, in one write."""
        await self._stream.send_all(b"".join([frame(0x1, t) for t in texts]))

    async def receive(self) -> list[bytes]:
        """Wait for at least one complete text message; return all that arrived.

        Returns ``[]`` once the server has closed the connection (see ``closed``).
        """
        while True:
            out = self._parse()
            if self._pongs:
                await self._stream.send_all(b"".join([frame(0xA, p) for p in self._pongs]))
                self._pongs.clear()
            if out or self.closed is not None:
                return out
            data = await self._stream.receive_some(262144)
            if not data:
                self.closed = self.closed or (1006, "connection lost")
                return []
            self._buf += data

    def _parse(self) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            at = pos + 2
            if n == 126:
                if len(buf) - at < 2:
                    break
                (n,) = struct.unpack_from("!H", buf, at)
                at += 2
            elif n == 127:
                if len(buf) - at < 8:
                    break
                (n,) = struct.unpack_from("!Q", buf, at)
                at += 8
            if b1 & 0x80:
                raise WireError("the server masked a frame")
            if len(buf) - at < n:
                break
            payload = bytes(buf[at : at + n])
            pos = at + n
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x0):
                self._parts.append(payload)
                if b0 & 0x80:
                    out.append(b"".join(self._parts))
                    self._parts.clear()
            elif opcode == 0x8:
                code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
                self.closed = (code, payload[2:].decode(errors="replace"))
                break
            elif opcode == 0x9:
                self._pongs.append(payload)
            elif opcode != 0xA:
                raise WireError(f"unexpected frame opcode {opcode:#x}")
        del buf[:pos]
        return out

    async def aclose(self) -> None:
        """Send a normal close frame (best effort) and close the socket."""
        try:
            with trio.move_on_after(1.0):
                await self._stream.send_all(frame(0x8, struct.pack("!H", 1000)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self._stream.aclose()
