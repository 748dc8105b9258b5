"""Fault injection and invariant checks shared by the fault matrix and the fuzzer."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed

from chatd.embedded import PostgresServer, RedisServer
from chatd.ports import ConnectionGone
from chatd.server import Server
from tests.client import Client
from tests.conftest import sql, wait_until

KINDS = ("switch", "kill", "stop")


@dataclass
class Faults:
    """Breaks one component of a running server in one of three ways."""

    srv: Server
    pg: PostgresServer
    redis: RedisServer

    async def inject(self, component: str, kind: str, seconds: float) -> None:
        """Break ``component`` for ``seconds``, then heal it (returns once healed)."""
        if kind == "switch":
            self.srv.chaos.break_for(component, seconds)
            await trio.sleep(seconds)
            self.srv.chaos.heal(component)
            return
        proc = self.pg if component == "postgres" else self.redis
        if kind == "stop":  # SIGSTOP: a hang, not an error
            proc.pause()
            try:
                await trio.sleep(seconds)
            finally:
                proc.resume()
            return
        assert kind == "kill"
        port = proc.port
        if component == "postgres":
            await trio.to_thread.run_sync(lambda: self.pg.stop("immediate"))
        else:
            self.redis.kill()  # SIGKILL; it comes back fresh and empty
        try:
            await trio.sleep(seconds)
        finally:
            await trio.to_thread.run_sync(lambda: proc.start(port=port))


@dataclass
class Watcher:
    """A subscriber that records every message seq and reply frame it receives."""

    client: Client
    conv: str
    seqs: list[int] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)  # stream -> text from deltas
    ends: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> message
    #: Replies this subscription followed (in its snapshot, or live deltas).
    live: set[str] = field(default_factory=set)
    head: int = 0

    async def start(self, nursery: trio.Nursery, after: int | None = None) -> None:
        snap = await self.client.subscribe(self.conv, after)
        self.head = snap["head"]
        for m in snap["messages"]:
            self._message(m)
        for s in snap["streams"]:
            assert s["offset"] == 0
            self.texts[s["stream"]] = s["text"]
            self.live.add(s["stream"])
        nursery.start_soon(self._read)

    def _message(self, m: dict[str, Any]) -> None:
        self.seqs.append(m["seq"])
        self.messages[m["id"]] = m

    async def _read(self) -> None:
        try:
            while True:
                f = await self.client.recv(timeout=None)
                kind = f.get("type")
                if kind == "message":
                    self._message(f)
                elif kind == "delta":
                    text = self.texts.get(f["stream"], "")
                    # Never a repeat and never a hole: each delta continues the text.
                    assert f["offset"] == len(text), (f, len(text))
                    self.texts[f["stream"]] = text + f["text"]
                    self.live.add(f["stream"])
                elif kind in ("stream.end", "stream.error"):
                    self.ends[f["stream"]] = f
        except (ConnectionClosed, ConnectionGone):
            return

    async def wait_for(self, n: int, timeout: float = 20.0) -> None:
        async def _enough() -> bool:
            return len(self.seqs) >= n

        await wait_until(_enough, timeout)


async def send_until_acked(
    client: Client, conv: str, mid: str, text: str = "hi", deadline: float = 30.0
) -> int:
    """Send ``mid``, retrying with the same id while chatd says unavailable."""
    with trio.fail_after(deadline):
        while True:
            reply = await client.request(
                {"op": "send", "conv": conv, "id": mid, "text": text}, "ack", timeout=deadline
            )
            if reply["type"] == "ack":
                return reply["seq"]
            assert reply["code"] == "unavailable" and reply["retryable"], reply
            await trio.sleep(0.1)


async def subscribe_until_ok(client: Client, conv: str, after: int | None) -> dict[str, Any]:
    """Subscribe, retrying while the snapshot cannot be loaded (Postgres down)."""
    with trio.fail_after(30):
        while True:
            frame: dict[str, Any] = {"op": "subscribe", "conv": conv}
            if after is not None:
                frame["after"] = after
            reply = await client.request(frame, "snapshot", timeout=30)
            if reply["type"] == "snapshot":
                return reply
            assert reply["code"] == "unavailable", reply
            await trio.sleep(0.2)


async def check_durable(srv: Server, conv: str, acked: dict[str, int]) -> list[dict[str, Any]]:
    """Invariants 1, 3, 4: acked => stored once with its seq; seqs gapless; ids unique."""

    async def _rows() -> list[dict[str, Any]]:
        return await sql(
            srv,
            "SELECT seq, client_id, role, status, body FROM messages WHERE conv_id = $1 ORDER BY seq",
            conv,
        )

    rows = await retrying(_rows)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1)), "seqs are gapless"
    by_id = {r["client_id"]: r["seq"] for r in rows}
    assert len(by_id) == len(rows), "a message id is stored at most once"
    for mid, seq in acked.items():
        assert by_id.get(mid) == seq, f"acked {mid} at seq {seq}, stored at {by_id.get(mid)}"
    return rows


async def lose_publish(srv: Server, conv: str, seq: int) -> None:
    """Commit message ``seq`` of ``conv`` with no outbox row, as if its publish had
    been lost: only a gap fill from Postgres can deliver it."""

    async def _commit(pool: Any) -> None:
        async with pool.acquire() as con, con.transaction():
            await con.execute("LOCK TABLE outbox IN EXCLUSIVE MODE")
            await con.execute(
                "INSERT INTO messages (conv_id, seq, client_id, user_id, role, status, body,"
                " created_at) VALUES ($1, $2, 'lost', 'writer', 'user', 'complete', 'lost', now())",
                conv,
                seq,
            )
            await con.execute("UPDATE conversations SET head = $2 WHERE id = $1", conv, seq)

    await srv.log.bridge.postgres(_commit, srv.log.pool)


async def check_outbox_drains(srv: Server, timeout: float = 20.0) -> None:
    """Invariant 7: the outbox drains to empty once everything is healthy."""

    async def _empty() -> bool:
        try:
            return (await sql(srv, "SELECT count(*) AS n FROM outbox"))[0]["n"] == 0
        except Exception:
            return False

    await wait_until(_empty, timeout)


async def retrying(fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Call ``fn`` until it stops failing with Unavailable (a component is recovering)."""
    from chatd.errors import Unavailable

    with trio.fail_after(timeout):
        while True:
            try:
                return await fn()
            except Unavailable:
                await trio.sleep(0.2)
