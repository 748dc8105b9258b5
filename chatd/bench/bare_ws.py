"""A bare trio-websocket server: the transport's floor for ``chatd bench reconnect``.

It answers a ``subscribe`` with a snapshot frame of the size chatd's would
have (``--missed`` messages), built once, and does nothing else: no
Postgres, no Redis, no hub. A storm against it measures what the WebSocket
stack and the load generator cost on this machine, so chatd's storm time can
be read as a ratio to it. Run as ``python -m chatd.bench.bare_ws --missed N``;
it prints its URL on the first line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket


def snapshot_frame(conv: str, missed: int) -> str:
    """A snapshot as chatd frames it, with ``missed`` short messages."""
    messages = [
        {
            "conv": conv,
            "seq": seq,
            "id": f"away{seq}",
            "user": "sender",
            "text": "storm",
            "ts": 1764576000000 + seq,
        }
        for seq in range(1, missed + 1)
    ]
    frame = {"type": "snapshot", "conv": conv, "messages": messages, "head": missed}
    frame |= {"recovered": True, "streams": []}
    return json.dumps(frame, separators=(",", ":"))


async def _serve(missed: int) -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                frame = json.loads(await ws.get_message())
                if frame.get("op") == "subscribe":
                    await ws.send_message(snapshot_frame(str(frame.get("conv")), missed))
        except ConnectionClosed:
            return

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        print(f"bare WebSocket server at ws://127.0.0.1:{server.port}/", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--missed", type=int, default=20)
    args = parser.parse_args()
    try:
        trio.run(_serve, args.missed)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
