"""Bring your own agent: a reply streamed into a conversation through a durable
stream (chatd/durable/agents.py), on a real chatd with its own Postgres and Redis."""

from __future__ import annotations

import httpx
import trio

from chatd.server import serve
from chatd.tokens import mint
from tests.client import Client
from tests.conftest import make_config

TEXT = {"Content-Type": "text/plain; charset=utf-8"}


def _config(postgres, redis_server, **durable):
    return make_config(
        postgres,
        redis_server,
        http={"requests_per_second": 0},
        durable={"agent_idle_timeout": 30.0, **durable},
    )


def _producer(seq: int) -> dict[str, str]:
    return {**TEXT, "Producer-Id": "agent-1", "Producer-Epoch": "0", "Producer-Seq": str(seq)}


async def test_an_agent_streams_a_reply_that_every_subscriber_sees_and_that_commits(
    nursery, postgres, redis_server
):
    srv = await nursery.start(serve, _config(postgres, redis_server))
    conv = "agent-happy"
    ws = await Client.open(nursery, srv.url)
    await ws.hello("alice")
    await ws.subscribe(conv)
    await ws.send_message(conv, "q1", "what is a durable stream?")
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as http:
        r = await http.post(f"/v1/conversations/{conv}/replies", json={"reply_to": 1})
        assert r.status_code == 201, r.text
        reply = r.json()
        assert r.headers["Location"] == reply["url"] and reply["conv"] == conv
        stream, path = reply["stream"], "/v1/stream/" + reply["path"]
        start = await ws.expect("stream.start", stream=stream)
        assert start["conv"] == conv
        parts = ["A durable ", "stream keeps ", "every token — café 🙂"]
        for i, part in enumerate(parts):
            r = await http.post(path, content=part.encode(), headers=_producer(i))
            assert r.status_code == 200, r.text
        # A retried append (its answer lost, say) is stored once.
        r = await http.post(path, content=parts[-1].encode(), headers=_producer(2))
        assert r.status_code == 204
        r = await http.post(path, headers={**_producer(3), "Stream-Closed": "true"})
        assert r.status_code == 204 and r.headers["Stream-Closed"] == "true"
        text, end = await ws.follow(conv, stream)
        assert text == "".join(parts)
        assert end["type"] == "stream.end" and end["status"] == "complete"
        _question, msg = await ws.messages(conv, 2)
        assert (msg["id"], msg["text"], msg["role"], msg["status"]) == (
            stream,
            "".join(parts),
            "assistant",
            "complete",
        )
        # The stream keeps the reply as it was generated, and the conversation has it.
        assert (await http.get(path)).text == "".join(parts)
        convo = (await http.get(f"/v1/conversations/{conv}")).json()
        assert [m["id"] for m in convo] == ["q1", stream]
        # Reply streams are made only by POST .../replies.
        assert (await http.put(f"/v1/stream/replies/{conv}/mine", headers=TEXT)).status_code == 403
        assert (await http.delete(path)).status_code == 403
        assert (await http.get(f"/v1/conversations/{conv}/replies")).status_code == 405


async def test_a_silent_agent_gets_its_reply_committed_interrupted(nursery, postgres, redis_server):
    srv = await nursery.start(serve, _config(postgres, redis_server, agent_idle_timeout=1.0))
    conv = "agent-silent"
    ws = await Client.open(nursery, srv.url)
    await ws.hello("alice")
    await ws.subscribe(conv)
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as http:
        reply = (await http.post(f"/v1/conversations/{conv}/replies")).json()
        path = "/v1/stream/" + reply["path"]
        assert (
            await http.post(path, content=b"half a thought", headers=_producer(0))
        ).status_code == 200
        # The agent is killed here: nothing more comes.
        text, end = await ws.follow(conv, reply["stream"], timeout=15)
        assert text == "half a thought" and end["status"] == "interrupted"
        (msg,) = await ws.messages(conv, 1)
        assert (msg["text"], msg["status"]) == ("half a thought", "interrupted")
        # Its stream is closed: an agent coming back learns the reply is over.
        r = await http.post(path, content=b"...", headers=_producer(1))
        assert r.status_code == 409 and r.headers["Stream-Closed"] == "true"
        # An agent that never says anything: the reply fails, nothing is committed.
        empty = (await http.post(f"/v1/conversations/{conv}/replies")).json()
        _, end = await ws.follow(conv, empty["stream"], timeout=15)
        assert end["type"] == "stream.error"
        assert [m["id"] for m in (await http.get(f"/v1/conversations/{conv}")).json()] == [
            reply["stream"]
        ]


async def test_a_user_stops_an_agents_reply(nursery, postgres, redis_server):
    srv = await nursery.start(serve, _config(postgres, redis_server))
    conv = "agent-stopped"
    ws = await Client.open(nursery, srv.url)
    await ws.hello("alice")
    await ws.subscribe(conv)
    async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as http:
        reply = (await http.post(f"/v1/conversations/{conv}/replies")).json()
        path = "/v1/stream/" + reply["path"]
        await http.post(path, content=b"going on and on", headers=_producer(0))
        await ws.expect("delta", stream=reply["stream"])
        await ws.send({"op": "stop", "conv": conv, "stream": reply["stream"], "ref": 1})
        _, end = await ws.follow(conv, reply["stream"], have="going on and on")
        assert end["status"] == "stopped"
        with trio.fail_after(5):
            while True:
                r = await http.post(path, content=b" and on", headers=_producer(1))
                if r.status_code == 409:
                    break
                await trio.sleep(0.05)
        assert r.headers["Stream-Closed"] == "true"


async def test_agents_need_write_access_to_the_conversation(nursery, postgres, redis_server):
    secret = "agent-replies-test-secret-0123456789abc"
    cfg = make_config(postgres, redis_server, auth={"mode": "jwt", "secret": secret})
    srv = await nursery.start(serve, cfg)

    def bearer(**convs: str) -> dict[str, str]:
        return {**TEXT, "Authorization": f"Bearer {mint(cfg.auth, 'bot', convs=convs)}"}

    async with httpx.AsyncClient(base_url=srv.http_url, timeout=30) as http:
        url = "/v1/conversations/room/replies"
        assert (await http.post(url)).status_code == 401
        assert (await http.post(url, headers=bearer(room="r"))).status_code == 403
        r = await http.post(url, headers=bearer(room="rw"))
        assert r.status_code == 201
        path = "/v1/stream/" + r.json()["path"]
        assert (await http.post(path, content=b"x", headers=bearer(room="r"))).status_code == 403
        r = await http.post(path, content=b"x", headers=bearer(room="w"))
        assert r.status_code == 204
        assert (await http.get(path, headers=bearer(room="r"))).text == "x"
