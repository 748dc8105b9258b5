"""The StreamStore port's contract (Durable Streams), against memory and Postgres alike.

Time is passed in (``now``), so expiry is tested without sleeping.
"""

from __future__ import annotations

import uuid

import orjson
import pytest

from chatd.durable.model import Append, Create, DSError, offset, parse_offset

T0 = 1_800_000_000.0


def _path() -> str:
    return f"t/{uuid.uuid4().hex[:12]}"


def _create(ctype: str = "text/plain", body: bytes = b"", **kw) -> Create:
    return Create(
        content_type=ctype,
        ttl=kw.pop("ttl", None),
        expires_at=kw.pop("expires_at", None),
        closed=kw.pop("closed", False),
        body=body,
        **kw,
    )


def _append(body: bytes, ctype: str | None = "text/plain", **kw) -> Append:
    return Append(content_type=ctype, body=body, close=kw.pop("close", False), **kw)


async def _all(store, path: str, now: float = T0) -> bytes:
    _row, chunks = await store.read(path, 0, 1 << 30, now)
    return b"".join(c[2] for c in chunks)


async def _append1(store, path: str, req: Append, now: float):
    (result,) = await store.append_many([(path, req)], now)
    if isinstance(result, DSError):
        raise result
    return result


async def _status(coro) -> int:
    with pytest.raises(DSError) as info:
        await coro
    return info.value.status


async def test_create_is_idempotent_only_with_the_same_configuration(stream_stores):
    store, p = stream_stores, _path()
    created, row = await store.create(p, _create(body=b"hello"), T0)
    assert created and row.tail == 5 and row.content_type == "text/plain"
    again, same = await store.create(p, _create(ctype="TEXT/PLAIN"), T0)
    assert not again and same.id == row.id and same.tail == 5
    assert await _status(store.create(p, _create(ctype="application/json"), T0)) == 409
    assert await _status(store.create(p, _create(ttl=60), T0)) == 409
    assert await _status(store.create(p, _create(closed=True), T0)) == 409
    assert await _status(store.create(_path(), _create(ttl=5, expires_at=T0 + 9), T0)) == 400


async def test_appends_extend_the_tail_and_reads_return_exactly_the_bytes(stream_stores):
    store, p = stream_stores, _path()
    await store.create(p, _create(), T0)
    plan = await _append1(store, p, _append(b"abc"), T0)
    assert plan.status == 204 and plan.headers["Stream-Next-Offset"] == offset(3)
    await _append1(store, p, _append("é🙂".encode()), T0)
    assert await _all(store, p) == "abcé🙂".encode()
    # A read from the middle of an append starts exactly there.
    row, chunks = await store.read(p, 2, 1 << 20, T0)
    assert b"".join(c[2] for c in chunks) == "cé🙂".encode() and chunks[-1][1] == row.tail
    # The tail: nothing; "now" (None): nothing either.
    assert (await store.read(p, row.tail, 1 << 20, T0))[1] == []
    assert (await store.read(p, None, 1 << 20, T0))[1] == []
    # A byte budget returns a prefix (never nothing), the rest on the next read.
    for i in range(5):
        await _append1(store, p, _append(bytes([65 + i]) * 1000), T0)
    _, first = await store.read(p, 0, 1500, T0)
    assert 0 < sum(len(c[2]) for c in first) <= 1500 + 1000
    _, rest = await store.read(p, first[-1][1], 1 << 20, T0)
    assert b"".join(c[2] for c in first + rest) == await _all(store, p)
    assert await _status(_append1(store, p, _append(b"x", ctype="application/json"), T0)) == 409
    assert await _status(_append1(store, p, _append(b""), T0)) == 400
    assert await _status(_append1(store, _path(), _append(b"x"), T0)) == 404


async def test_json_mode_keeps_messages_and_flattens_one_level(stream_stores):
    store, p = stream_stores, _path()
    _, row = await store.create(p, _create("application/json", b"[]"), T0)
    assert row.tail == 0
    await _append1(store, p, _append(b'{"a": 1}', "application/json"), T0)
    await _append1(store, p, _append(b'[[1,2], {"b": "x"}]', "application/json"), T0)
    row, chunks = await store.read(p, 0, 1 << 20, T0)
    assert row.tail == 3
    assert [orjson.loads(c[2]) for c in chunks] == [{"a": 1}, [1, 2], {"b": "x"}]
    assert await _status(_append1(store, p, _append(b"[]", "application/json"), T0)) == 400
    assert await _status(_append1(store, p, _append(b"{bad", "application/json"), T0)) == 400


async def test_idempotent_producers(stream_stores):
    store, p = stream_stores, _path()
    await store.create(p, _create(), T0)

    async def send(body: bytes, epoch: int, seq: int):
        return await _append1(store, p, _append(body, producer=("w", epoch, seq)), T0)

    assert (await send(b"a", 0, 0)).status == 200
    assert (await send(b"b", 0, 1)).status == 200
    dup = await send(b"b", 0, 1)  # a retry: stored once
    assert dup.status == 204 and dup.headers["Producer-Seq"] == "1"
    with pytest.raises(DSError) as gap:
        await send(b"d", 0, 3)
    assert gap.value.status == 409 and gap.value.headers["Producer-Expected-Seq"] == "2"
    assert (await send(b"c", 1, 0)).status == 200  # a restart: new epoch
    with pytest.raises(DSError) as zombie:
        await send(b"z", 0, 2)
    assert zombie.value.status == 403 and zombie.value.headers["Producer-Epoch"] == "1"
    assert await _status(send(b"z", 2, 5)) == 400  # a new epoch starts at 0
    assert await _all(store, p) == b"abc"


async def test_closing(stream_stores):
    store, p = stream_stores, _path()
    await store.create(p, _create(body=b"x"), T0)
    plan = await _append1(store, p, _append(b"end", close=True, producer=("w", 0, 0)), T0)
    assert plan.row.closed and plan.headers["Stream-Closed"] == "true"
    # The same closing request again: a duplicate; anything else: 409 with the final offset.
    again = await _append1(store, p, _append(b"end", close=True, producer=("w", 0, 0)), T0)
    assert again.status == 204 and not again.changed
    with pytest.raises(DSError) as closed:
        await _append1(store, p, _append(b"more"), T0)
    assert closed.value.status == 409 and closed.value.headers["Stream-Next-Offset"] == offset(4)
    assert (await _append1(store, p, _append(b"", None, close=True), T0)).status == 204
    assert (await store.head(p, T0)).closed and await _all(store, p) == b"xend"


async def test_ttl_and_expiry(stream_stores):
    store = stream_stores
    sliding, fixed = _path(), _path()
    await store.create(sliding, _create(ttl=10), T0)
    await store.create(fixed, _create(expires_at=T0 + 10), T0)
    # Reads and writes renew a TTL; head does not.
    await store.read(sliding, 0, 100, T0 + 8)
    await _append1(store, fixed, _append(b"x"), T0 + 8)
    await store.head(sliding, T0 + 17)
    assert (await store.head(sliding, T0 + 17.9)).ttl == 10
    assert await _status(store.head(fixed, T0 + 10)) == 404
    assert await _status(store.head(sliding, T0 + 18)) == 404
    # An expired path can be created again, as a new stream.
    created, row = await store.create(fixed, _create(), T0 + 11)
    assert created and row.tail == 0
    left = _path()
    await store.create(left, _create(ttl=1), T0)
    assert await store.sweep(T0 + 5) >= 1
    assert await _status(store.read(left, 0, 10, T0)) == 404  # swept for good


async def test_forks_copy_up_to_their_offset_and_outlive_a_deleted_source(stream_stores):
    store, src, fork, sub = stream_stores, _path(), _path(), _path()
    await store.create(src, _create(body=b"hello "), T0)
    await _append1(store, src, _append(b"world"), T0)
    _, row = await store.create(fork, _create(None, fork_of=src, fork_offset=offset(6)), T0)
    assert row.tail == 6 and row.content_type == "text/plain"
    # Same offsets as the source; appends to either stay apart.
    await _append1(store, fork, _append(b"there"), T0)
    await _append1(store, src, _append(b"!"), T0)
    assert await _all(store, fork) == b"hello there" and await _all(store, src) == b"hello world!"
    # A sub-offset reaches into the next append.
    await store.create(sub, _create(fork_of=src, fork_offset=offset(6), fork_sub=3), T0)
    assert await _all(store, sub) == b"hello wor"
    assert await _status(store.create(_path(), _create(fork_of=src, fork_offset=offset(99)), T0))
    assert await _status(store.create(_path(), _create(fork_of="t/none"), T0)) == 404
    assert await _status(store.create(_path(), _create("application/json", fork_of=src), T0))
    # Deleting the source while forks read it: 410 for the source, its path blocked.
    await store.delete(src, T0)
    assert await _status(store.head(src, T0)) == 410
    assert await _status(store.create(src, _create(), T0)) == 409
    assert await _all(store, fork) == b"hello there"
    await store.delete(fork, T0)
    await store.delete(sub, T0)
    # The last fork gone, the source goes too.
    assert await _status(store.head(src, T0)) == 404
    created, _ = await store.create(src, _create(), T0)
    assert created


async def test_offsets_parse_and_sort_like_positions():
    assert parse_offset("-1") == 0 and parse_offset(None) == 0
    assert parse_offset("now", 7) == 7
    assert parse_offset(offset(123)) == 123
    assert sorted([offset(10), offset(9), offset(100)]) == [offset(9), offset(10), offset(100)]
    for bad in ("abc", "1", "0_1", offset(1) + "x"):
        with pytest.raises(DSError):
            parse_offset(bad)


async def test_a_batch_applies_its_appends_in_order_and_refuses_each_on_its_own(stream_stores):
    store, a, b = stream_stores, _path(), _path()
    await store.create(a, _create(), T0)
    await store.create(b, _create("application/json"), T0)

    def prod(body: bytes, seq: int) -> Append:
        return _append(body, producer=("w", 0, seq))

    results = await store.append_many(
        [
            (a, prod(b"1", 0)),
            (b, _append(b'[{"x":1},{"x":2}]', "application/json")),
            (a, prod(b"2", 1)),
            (a, prod(b"2", 1)),  # a retry inside the same batch: a duplicate
            (a, prod(b"9", 5)),  # a gap: refused, the rest goes on
            ("t/missing", _append(b"x")),
            (a, _append(b"3", close=True)),
            (a, _append(b"4")),  # after the close in the same batch
        ],
        T0,
    )
    kinds = [r.status if not isinstance(r, DSError) else ("refused", r.status) for r in results]
    assert kinds == [200, 204, 200, 204, ("refused", 409), ("refused", 404), 204, ("refused", 409)]
    assert await _all(store, a) == b"123"
    assert (await store.head(a, T0)).closed and (await store.head(b, T0)).tail == 2


async def test_a_failing_batch_is_refused_and_the_service_goes_on():
    """A bug in the store fails its batch's requests (StoreError), not the server."""
    import trio

    from chatd.adapters.memory_durable import MemoryStreams
    from chatd.adapters.memory_transport import MemoryBroker, MemoryTransport
    from chatd.chaos import Chaos
    from chatd.config import DurableConfig
    from chatd.durable.service import open_streams
    from chatd.errors import StoreError

    class Flaky(MemoryStreams):
        broken = True

        async def append_many(self, items, now):
            if self.broken:
                raise RuntimeError("a bug")
            return await super().append_many(items, now)

    store = Flaky()
    transport = MemoryTransport(MemoryBroker(), Chaos())
    _, wakes = trio.open_memory_channel[str](10)
    async with open_streams(store, transport, DurableConfig(), wakes) as streams:
        await streams.create("t/x", _create())
        with pytest.raises(StoreError):
            await streams.append("t/x", _append(b"lost"))
        store.broken = False
        plan = await streams.append("t/x", _append(b"kept"))
        assert plan.headers["Stream-Next-Offset"] == offset(4)
