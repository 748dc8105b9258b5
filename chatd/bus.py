"""The bus: Redis pub/sub, a disposable transport that holds no truth.

One Redis client per process for publishing, and one pub/sub connection per
process multiplexed to every local subscriber. The pub/sub connection is only
ever touched from :meth:`Bus.pump`, one gateway crossing per batch of
messages; channel (un)subscriptions requested meanwhile are applied inside
that same call, so the connection is never used from two tasks at once. The
pump blocks on its read; a wanted subscription wakes it by a publish to a
channel of this process's own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
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
_WAKE_PREFIX = "chatd:wake:"


def channel(conv: str) -> str:
    """The Redis channel carrying a conversation's events."""
    return _PREFIX + conv


def conv_of(chan: str) -> str | None:
    return chan[len(_PREFIX) :] if chan.startswith(_PREFIX) else None


def _streams_key(conv: str) -> str:
    # Hash: stream id -> stream metadata (JSON), for every in-flight reply.
    return f"chatd:streams:{conv}"


def _partial_prefix(conv: str) -> str:
    return f"chatd:partial:{conv}:"


# The streaming lane, one atomic call per stream per batch: extend the partial
# (append only if Redis holds exactly what we think, else report -1 so the
# caller rewrites it whole: Redis may have restarted empty), refresh the TTLs,
# and publish the frames. Appending and publishing atomically means a reader
# that subscribed first and then reads the partial misses nothing.
_LANE_SCRIPT = """
local ttl = tonumber(ARGV[6])
if ARGV[2] == 'a' then
  if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[3]) then return -1 end
  if ARGV[4] ~= '' then redis.call('APPEND', KEYS[1], ARGV[4]) end
else
  redis.call('SET', KEYS[1], ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[1], ttl)
else
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
for i = 8, #ARGV do redis.call('PUBLISH', ARGV[7], ARGV[i]) end
return redis.call('STRLEN', KEYS[1])
"""

# Every in-flight reply of a conversation with its partial text, atomically.
_READ_STREAMS_SCRIPT = """
local meta = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #meta, 2 do
  out[#out + 1] = meta[i]
  out[#out + 1] = meta[i + 1]
  out[#out + 1] = redis.call('GET', ARGV[1] .. meta[i]) or ''
end
return out
"""


@dataclass(frozen=True)
class LaneOp:
    """One stream's update in a lane batch (see ``_LANE_SCRIPT``)."""

    conv: str
    stream: str
    #: The partial's UTF-8 length in Redis before this op, or -1 to rewrite it whole.
    expect_bytes: int
    #: Text to append (or, when rewriting, the whole partial).
    text: str
    #: The reply's tokens; the first ``upto`` of them are the whole partial,
    #: joined only if Redis does not hold what we expect.
    parts: list[str]
    upto: int
    #: Stream metadata JSON while the stream lives; "" ends it (partial deleted).
    meta: str
    frames: tuple[str, ...]


@dataclass(frozen=True)
class InFlight:
    """A reply still generating, as read from Redis."""

    stream: str
    meta: dict[str, Any]
    text: str


@dataclass(frozen=True)
class BusMessage:
    kind: str  # "message", "subscribe" or "control"
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


def _lane_args(op: LaneOp, ttl: int, rewrite: bool) -> list[Any]:
    return [
        op.stream,
        "s" if rewrite else "a",
        op.expect_bytes,
        "".join(op.parts[: op.upto]) if rewrite else op.text,
        op.meta,
        ttl,
        channel(op.conv),
        *op.frames,
    ]


async def _aio_lane(client: aioredis.Redis, ops: list[LaneOp], ttl: int) -> list[int]:
    keys = [(_partial_prefix(op.conv) + op.stream, _streams_key(op.conv)) for op in ops]
    async with client.pipeline(transaction=False) as pipe:
        for op, (k1, k2) in zip(ops, keys, strict=True):
            pipe.eval(_LANE_SCRIPT, 2, k1, k2, *_lane_args(op, ttl, op.expect_bytes < 0))
        results = [int(r) for r in await pipe.execute()]
    stale = [i for i, r in enumerate(results) if r < 0]
    if stale:
        async with client.pipeline(transaction=False) as pipe:
            for i in stale:
                pipe.eval(_LANE_SCRIPT, 2, *keys[i], *_lane_args(ops[i], ttl, True))
            for i, r in zip(stale, await pipe.execute(), strict=True):
                results[i] = int(r)
    return results


async def _aio_read_streams(client: aioredis.Redis, conv: str) -> list[InFlight]:
    flat = await client.eval(_READ_STREAMS_SCRIPT, 1, _streams_key(conv), _partial_prefix(conv))
    out = []
    for i in range(0, len(flat), 3):
        try:
            meta = orjson.loads(flat[i + 1])
        except orjson.JSONDecodeError:
            continue
        out.append(InFlight(flat[i], meta, flat[i + 2]))
    return out


async def _aio_read_partial(client: aioredis.Redis, conv: str, stream: str) -> str | None:
    return await client.get(_partial_prefix(conv) + stream)


async def _aio_stream_exists(client: aioredis.Redis, conv: str, stream: str) -> bool:
    return bool(await client.hexists(_streams_key(conv), stream))


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
        # A channel only this process listens on: publishing to it ends the
        # pump's blocking read, so a new subscription is applied at once
        # without the pump polling while idle.
        self._wake_channel = _WAKE_PREFIX + uuid.uuid4().hex
        self._wake_needed = trio.Event()
        self._broken = False
        self.published = 0

    async def publish(self, conv: str, data: str) -> None:
        """Publish one ephemeral event (typing, deltas). Raises BusUnavailable."""
        await self.gateway.redis(_aio_publish, self.client, channel(conv), data)
        self.published += 1

    async def ping(self) -> bool:
        return await self.gateway.redis(_aio_ping, self.client)

    async def publish_control(self, data: str) -> None:
        """Publish a message to every chatd process (e.g. stop a stream running elsewhere)."""
        await self.gateway.redis(_aio_publish, self.client, CONTROL_CHANNEL, data)

    # -- the streaming lane -------------------------------------------------

    async def lane(self, ops: list[LaneOp], ttl: int) -> list[int]:
        """Apply a batch of stream updates in one crossing; returns each partial's byte length."""
        return await self.gateway.redis(_aio_lane, self.client, ops, ttl)

    async def read_streams(self, conv: str) -> list[InFlight]:
        """The conversation's in-flight replies with their partial text."""
        return await self.gateway.redis(_aio_read_streams, self.client, conv)

    async def read_partial(self, conv: str, stream: str) -> str | None:
        return await self.gateway.redis(_aio_read_partial, self.client, conv, stream)

    async def stream_exists(self, conv: str, stream: str) -> bool:
        return await self.gateway.redis(_aio_stream_exists, self.client, conv, stream)

    async def pump(self, wait: float, limit: int = 1000) -> list[BusMessage]:
        """Apply pending (un)subscriptions, then return the next batch of messages.

        Waits at most ``wait`` seconds for the first message. ``subscribe``
        confirmations are returned too: each one means the channel is live
        (again), so the caller re-reads what it may have missed from Postgres.
        """
        return await self.gateway.redis(
            self._aio_pump, wait, limit, deadline=wait + self._config.redis.command_timeout
        )

    def want(self, conv: str) -> None:
        """Local subscribers want ``conv``'s events: the pump subscribes at once."""
        if conv not in self.wanted:
            self.wanted.add(conv)
            self._wake_needed.set()

    def unwant(self, conv: str) -> None:
        """No local subscriber wants ``conv`` any more (unsubscribed at the next pump)."""
        self.wanted.discard(conv)

    async def run_waker(self) -> None:
        """Wake the pump whenever a subscription is wanted; owned by the hub's nursery.

        Many joins in a row cost one publish. If the publish fails, the pump
        still applies the change when its current wait ends.
        """
        while True:
            await self._wake_needed.wait()
            self._wake_needed = trio.Event()
            if self.wanted == self._subscribed:
                continue
            try:
                await self.gateway.redis(_aio_publish, self.client, self._wake_channel, "")
            except BusUnavailable as exc:
                log.debug("could not wake the pub/sub pump: %s", exc)

    async def _aio_sync(self) -> None:
        ps = self._pubsub
        if ps.connection is None:
            await ps.subscribe(CONTROL_CHANNEL, self._wake_channel)
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
            timeout = 0.0 if out else max(0.0, deadline - loop.time())
            msg = await self._pubsub.get_message(timeout=timeout)
            if msg is not None:
                kind = msg["type"]
                chan = msg["channel"]
                conv = conv_of(chan)
                if conv is not None and kind in ("message", "subscribe"):
                    out.append(BusMessage(kind, conv, msg["data"] if kind == "message" else ""))
                elif chan == CONTROL_CHANNEL and kind == "message":
                    out.append(BusMessage("control", "", msg["data"]))
                # A wake-up carries nothing: the loop re-checks the wanted set.
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
