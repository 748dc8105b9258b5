"""The OpenAI-compatible backend against a local server speaking the same SSE format.

The server is a real HTTP/1.1 listener on a free port. What it does is chosen
by the prompt: ``mode=ok`` streams a reply and ``[DONE]``; ``mode=die`` closes
the connection mid-stream; ``mode=malformed`` sends a broken chunk;
``mode=500`` answers with an error; ``mode=stall`` stops sending.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from chatd.server import serve
from tests.conftest import make_config, sql

_TOKENS = ["Hel", "lo", ", wor", "ld ", "🙂", "!"]


class SSEServer:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.port = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._serve(stream)
        except trio.BrokenResourceError:
            pass  # chatd hung up (it rejected a chunk); that is its right

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            raw = b""
            while b"\r\n\r\n" not in raw:
                raw += await stream.receive_some(65536)
            head, _, body = raw.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                body += await stream.receive_some(65536)
            req = json.loads(body)
            self.requests.append({"line": lines[0], "headers": headers, "body": req})
            prompt = req["messages"][-1]["content"]
            mode = prompt.split("mode=")[1].split()[0] if "mode=" in prompt else "ok"
            if mode == "500":
                msg = b'{"error":"model overloaded"}'
                await stream.send_all(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(msg), msg)
                )
                return
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Cache-Control: no-cache\r\nConnection: close\r\n\r\n"
            )
            for i, tok in enumerate(_TOKENS):
                if mode == "die" and i == 3:
                    return  # connection closed mid-stream, no [DONE]
                if mode == "malformed" and i == 2:
                    await stream.send_all(b'data: {"choices": [{"delta": {"content": \n\n')
                    continue
                if mode == "stall" and i == 2:
                    await trio.sleep(60)
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": tok}}],
                }
                await stream.send_all(f"data: {json.dumps(chunk)}\n\n".encode())
                await trio.sleep(0.01)
            await stream.send_all(b": keep-alive comment\n\n")
            done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await stream.send_all(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture
async def llm(nursery):
    return await nursery.start(SSEServer().run)


@pytest.fixture
async def srv(nursery, postgres, redis_server, llm):
    cfg = make_config(
        postgres,
        redis_server,
        model={
            "backend": "openai",
            "base_url": f"http://127.0.0.1:{llm.port}/v1",
            "model": "test-model",
            "api_key": "sk-test",
            "system_prompt": "be brief",
            "idle_timeout": 1.0,
        },
    )
    return await nursery.start(serve, cfg)


async def _rows(srv, conv):
    return await sql(
        srv, "SELECT status, body FROM messages WHERE conv_id = $1 AND role = 'assistant'", conv
    )


async def test_openai_stream_commits_the_reply_with_context(srv, llm, connect, conv):
    c = await connect(srv, "alice")
    await c.subscribe(conv)
    await c.send_message(conv, "m0", "earlier message")
    ack = await c.send_reply(conv, "m1", "say hello mode=ok")
    text, end = await c.follow(conv, ack["stream"])
    assert end["type"] == "stream.end"
    assert text == "".join(_TOKENS)
    assert await _rows(srv, conv) == [{"status": "complete", "body": text}]
    req = llm.requests[-1]
    assert req["line"].startswith("POST /v1/chat/completions")
    assert req["headers"]["authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "test-model" and body["stream"] is True
    assert [m["content"] for m in body["messages"]] == [
        "be brief",
        "earlier message",
        "say hello mode=ok",
    ]


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("die", "ended before"),
        ("malformed", "malformed"),
        ("500", "HTTP 500"),
        ("stall", "timed out"),
    ],
)
async def test_openai_failures_end_in_stream_error(srv, connect, conv, mode, words):
    c = await connect(srv, "alice")
    await c.subscribe(conv)
    ack = await c.send_reply(conv, "m1", f"go mode={mode}")
    _, end = await c.follow(conv, ack["stream"], timeout=10)
    assert end["type"] == "stream.error" and end["code"] == "model_failed"
    assert words in end["message"], end
    assert await _rows(srv, conv) == [], "a failed reply is never written"
