"""The WebSocket adapter: the one place that uses trio-websocket's internals.

If the pinned trio-websocket changes underneath, these fail loudly (the
server itself would fall back to the public ``send_message``, slower).
"""

from __future__ import annotations

import pytest
import trio
import trio_websocket
from trio_websocket import WebSocketServer, open_websocket_url, serve_websocket
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from chatd.adapters.websocket import FAST_PATH, PINNED, WsConnection, has_internals, text_frame


def test_the_pinned_trio_websocket_is_installed():
    assert trio_websocket.__version__.startswith(PINNED), (
        f"chatd/adapters/websocket.py was written against trio-websocket {PINNED}x, "
        f"found {trio_websocket.__version__}: check its internals, then move the pin"
    )
    assert FAST_PATH
    # chatd's own accept loop hands each stream to this (chatd/http/listener.py).
    assert hasattr(WebSocketServer, "_handle_connection")


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frames_are_what_wsproto_writes(size):
    """The adapter frames text itself; it must be byte for byte wsproto's frame."""
    text = ("é" * size)[: size // 2] + "x" * (size - size // 2)  # multi-byte UTF-8 too
    server = Connection(ConnectionType.SERVER)
    assert text_frame(text) == server.send(TextMessage(data=text))
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(text_frame(text))
    (event,) = client.events()
    assert event.data == text and event.message_finished


async def test_frames_written_together_arrive_one_by_one_over_a_real_socket(nursery):
    texts = ["a", "é" * 200, "x" * 70000, '{"type":"pong"}']
    seen: dict[str, object] = {}

    async def handler(request):
        ws = await request.accept()
        conn = WsConnection(ws)
        seen["internals"] = has_internals(ws) and conn._fast
        await conn.send_frames(texts)
        await ws.get_message()  # wait for the client to finish reading

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as client:
        with trio.fail_after(5):
            got = [await client.get_message() for _ in texts]
        await client.send_message("done")
    assert seen["internals"] is True, "the fast path was not used"
    assert got == texts
