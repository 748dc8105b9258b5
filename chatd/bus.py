"""The bus: Redis pub/sub, a disposable transport that holds no truth.

One Redis client per process for publishing, and one pub/sub connection per
process multiplexed to every local subscriber. The pub/sub connection is only
ever touched from :meth:`Bus.pump`, one gateway crossing per batch of
messages; channel (un)subscriptions requested meanwhile are applied inside
that same call, so the connection is never used from two tasks at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
import trio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from chatd.config import Config
from chatd.errors import BusUnavailable
from chatd.gateway import Gateway

log = logging.getLogger("chatd.bus")

CONTROL_CHANNEL = "chatd:control"
_PREFIX = "chatd:conv:"
# How often the asyncio-side pump looks for new (un)subscriptions while waiting.
_PUMP_SLICE = 0.01


def channel(conv: str) -> str:
    """The Redis channel carrying a conversation's events."""
    return _PREFIX + conv


def conv_of(chan: str) -> str | None:
    return chan[len(_PREFIX) :] if chan.startswith(_PREFIX) else None


@dataclass(frozen=True)
class BusMessage:
    kind: str  # "message" or "subscribe"
    conv: str
    data: str


async def _aio_open(config: Config) -> tuple[aioredis.Redis, aioredis.client.PubSub]:
    rc = config.redis
    client = aioredis.Redis.from_url(
        rc.url,
        socket_timeout=rc.command_timeout,
        socket_connect_timeout=rc.connect_timeout,
        # One quick retry recovers a stale connection after a Redis restart;
        # anything longer is the gateway's deadline and the caller's backoff.
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
        decode_responses=True,
    )
    return client, client.pubsub()


async def _aio_close(client: aioredis.Redis, pubsub: aioredis.client.PubSub) -> None:
    try:
        await pubsub.aclose()
    finally:
        await client.aclose()


async def _aio_publish(client: aioredis.Redis, chan: str, data: str) -> None:
    await client.publish(chan, data)


async def _aio_ping(client: aioredis.Redis) -> bool:
    return bool(await client.ping())


class Bus:
    """Publishing and the process's single pub/sub path."""

    def __init__(
        self,
        gateway: Gateway,
        client: aioredis.Redis,
        pubsub: aioredis.client.PubSub,
        config: Config,
    ) -> None:
        self.gateway = gateway
        self.client = client
        self._pubsub = pubsub
        self._config = config
        #: Conversations local subscribers want; the pump converges Redis to it.
        self.wanted: set[str] = set()
        self._subscribed: set[str] = set()
        self._broken = False
        self.published = 0

    async def publish(self, conv: str, data: str) -> None:
        """Publish one ephemeral event (typing, deltas). Raises BusUnavailable."""
        await self.gateway.redis(_aio_publish, self.client, channel(conv), data)
        self.published += 1

    async def ping(self) -> bool:
        return await self.gateway.redis(_aio_ping, self.client)

    async def pump(self, wait: float, limit: int = 1000) -> list[BusMessage]:
        """Apply pending (un)subscriptions, then return the next batch of messages.

        Waits at most ``wait`` seconds for the first message. ``subscribe``
        confirmations are returned too: each one means the channel is live
        (again), so the caller re-reads what it may have missed from Postgres.
        """
        return await self.gateway.redis(
            self._aio_pump, wait, limit, deadline=wait + self._config.redis.command_timeout
        )

    async def _aio_sync(self) -> None:
        ps = self._pubsub
        if ps.connection is None:
            await ps.subscribe(CONTROL_CHANNEL)
        add = self.wanted - self._subscribed
        drop = self._subscribed - self.wanted
        if add:
            await ps.subscribe(*(channel(c) for c in add))
            self._subscribed |= add
        if drop:
            await ps.unsubscribe(*(channel(c) for c in drop))
            self._subscribed -= drop

    async def _aio_pump(self, wait: float, limit: int) -> list[BusMessage]:
        if self._broken:
            await self._aio_replace_pubsub()
        try:
            return await self._aio_read(wait, limit)
        except BaseException:
            # Failed or cancelled mid-read: the connection's state is unknown.
            # Start over with a fresh one next time; every channel is then
            # re-subscribed and each confirmation triggers a resync.
            self._broken = True
            raise

    async def _aio_replace_pubsub(self) -> None:
        old, self._pubsub = self._pubsub, self.client.pubsub()
        self._subscribed = set()
        self._broken = False
        try:
            await old.aclose()
        except Exception as exc:  # the old connection is already dead; closing is best-effort
            log.debug("closing a failed pub/sub connection: %s", exc)

    async def _aio_read(self, wait: float, limit: int) -> list[BusMessage]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        out: list[BusMessage] = []
        while True:
            if self.wanted != self._subscribed or self._pubsub.connection is None:
                await self._aio_sync()
            timeout = 0.0 if out else max(0.0, min(_PUMP_SLICE, deadline - loop.time()))
            msg = await self._pubsub.get_message(timeout=timeout)
            if msg is not None:
                kind = msg["type"]
                conv = conv_of(msg["channel"])
                if conv is not None and kind in ("message", "subscribe"):
                    out.append(BusMessage(kind, conv, msg["data"] if kind == "message" else ""))
                if len(out) >= limit:
                    return out
                continue
            if out or loop.time() >= deadline:
                return out


@asynccontextmanager
async def open_bus(gateway: Gateway, config: Config) -> AsyncIterator[Bus]:
    """Create the Redis client for the lifetime of the server.

    Redis being down at start is not fatal: it holds no truth, and chatd keeps
    accepting durable writes while the relay waits for it.
    """
    client, pubsub = await gateway.redis(_aio_open, config)
    bus = Bus(gateway, client, pubsub, config)
    try:
        await bus.ping()
    except BusUnavailable as exc:
        log.warning(
            "Redis is not reachable at start (%s); continuing, live fan-out waits for it", exc
        )
    try:
        yield bus
    finally:
        with trio.move_on_after(2.0, shield=True):
            try:
                await gateway.redis(_aio_close, client, pubsub, deadline=2.0)
            except BusUnavailable as exc:
                log.warning("Redis client did not close cleanly: %s", exc)
