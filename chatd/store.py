"""The store: Postgres, the source of truth.

Writes go through one group committer: sends arriving while a commit is in
flight (or within ``group_commit_window_ms``) are committed together in one
transaction and one round trip (the ``chatd_commit`` function), each still
answered individually. Per conversation, the
``conversations`` row is locked inside that transaction and seqs are assigned
from its ``head``, so they are gapless and strictly increasing. Each message
row and its outbox row land in the same transaction.

After each commit the new outbox rows go to :attr:`Store.on_committed` (the
relay publishes them at once); the ids it reports published are deleted by
the next commit's transaction, or after ``_FLUSH_AFTER`` if no send comes.

Functions prefixed ``_aio_`` run on the asyncio side, called via the gateway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import trio

from chatd import schema
from chatd.config import Config
from chatd.errors import ChatdError, StoreError, StoreUnavailable
from chatd.gateway import Gateway

log = logging.getLogger("chatd.store")

NOTIFY_CHANNEL = "chatd_outbox"

#: With published rows to delete and no send to carry the delete, commit it alone after this.
_FLUSH_AFTER = 0.05
#: At most this many published ids wait for deletion; beyond that (Postgres has been
#: down for long) the oldest are forgotten, and a relay republishes them later: harmless.
_MAX_PUBLISHED = 100_000


# The per-send records are plain slotted dataclasses: a frozen one's __init__
# costs 4x as much, and a send builds several.
@dataclass(slots=True)
class NewMessage:
    """A message to commit. ``client_id`` is the idempotency key within ``conv``."""

    conv: str
    client_id: str
    user: str
    text: str
    role: str = "user"
    status: str = "complete"


@dataclass(slots=True)
class Committed:
    """The outcome of one send: its seq, and whether it had been committed before."""

    conv: str
    client_id: str
    seq: int
    duplicate: bool
    message: dict[str, Any]


@dataclass(slots=True)
class OutboxEvent:
    """A committed outbox row: the live event to publish on ``conv``'s channel."""

    id: int
    conv: str
    payload: str


@dataclass
class _Pending:
    msg: NewMessage
    on_done: Callable[[Committed | ChatdError], None]


@dataclass(frozen=True)
class Snapshot:
    messages: list[dict[str, Any]]
    head: int
    #: False when the client's cursor was too far behind to recover in one
    #: snapshot: ``messages`` then holds only the latest ones.
    recovered: bool
    #: Those of the asked-about stream ids that are already committed messages.
    committed_streams: frozenset[str] = frozenset()


def message_dict(row: asyncpg.Record | dict[str, Any]) -> dict[str, Any]:
    """A message as it appears on the wire (without ``type``/``conv``)."""
    return {
        "seq": row["seq"],
        "id": row["client_id"],
        "user": row["user_id"],
        "role": row["role"],
        "status": row["status"],
        "text": row["body"],
        "ts": _millis(row["created_at"]),
    }


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _millis(t: datetime) -> int:
    # Exact (no float rounding), so it matches the commit function's floor(epoch * 1000).
    return (t - _EPOCH) // _MS


def message_event(conv: str, message: dict[str, Any]) -> dict[str, Any]:
    """The live ``message`` event for one committed message."""
    return {"type": "message", "conv": conv, **message}


_COLUMNS = "seq, client_id, user_id, role, status, body, created_at"


async def _aio_create_pool(config: Config) -> asyncpg.Pool:
    pg = config.postgres
    return await asyncpg.create_pool(
        pg.dsn,
        min_size=pg.pool_min,
        max_size=pg.pool_max,
        timeout=pg.connect_timeout,
        command_timeout=pg.command_timeout,
        # Idle connections are recycled so a restarted server is rediscovered quickly.
        max_inactive_connection_lifetime=60.0,
        reset=_keep_session,
    )


async def _keep_session(con: asyncpg.Connection) -> None:
    """Release a connection as it is (asyncpg still rolls back an open transaction).

    asyncpg's default reset (unlock advisory locks, CLOSE ALL, UNLISTEN *,
    RESET ALL) is a round trip on every release: as costly as the work itself
    for a one-statement commit. chatd never changes session state on pool
    connections (LISTEN uses its own connection; the migration lock is
    released in a ``finally``).
    """


def _event_template(m: NewMessage) -> tuple[str, str]:
    """The live event's JSON around its seq and ts, which only the commit knows.

    Must encode exactly as ``encode(message_event(conv, message_dict(row)))``.
    """
    d = orjson.dumps
    head = b'{"type":"message","conv":' + d(m.conv) + b',"seq":'
    mid = b"".join(
        [
            *(b',"id":', d(m.client_id), b',"user":', d(m.user), b',"role":', d(m.role)),
            *(b',"status":', d(m.status), b',"text":', d(m.text), b',"ts":'),
        ]
    )
    return head.decode(), mid.decode()


async def _aio_commit_batch(
    pool: asyncpg.Pool, msgs: list[NewMessage], published: list[int], notify: bool
) -> tuple[list[Committed], list[OutboxEvent]]:
    # One round trip: see chatd/migrations/0004_publish_after_commit.sql.
    templates = [_event_template(m) for m in msgs]
    rows = await pool.fetch(
        "SELECT * FROM chatd_commit($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        [m.conv for m in msgs],
        [m.client_id for m in msgs],
        [m.user for m in msgs],
        [m.role for m in msgs],
        [m.status for m in msgs],
        [m.text for m in msgs],
        [t[0] for t in templates],
        [t[1] for t in templates],
        published,
        notify,
    )
    results = []
    events = []
    for m, r in zip(msgs, rows, strict=True):
        message = {
            "seq": r["seq"],
            "id": m.client_id,
            "user": r["user_id"],
            "role": r["role"],
            "status": r["status"],
            "text": r["body"],
            "ts": _millis(r["created_at"]),
        }
        results.append(Committed(m.conv, m.client_id, r["seq"], r["duplicate"], message))
        if r["outbox_id"] is not None:
            events.append(OutboxEvent(r["outbox_id"], m.conv, r["payload"]))
    return results, events


async def _aio_snapshots(
    pool: asyncpg.Pool,
    conv: str,
    afters: list[int | None],
    limit: int,
    max_catchup: int,
    streams: list[str],
) -> list[Snapshot]:
    # One round trip for several clients joining at once, all on one database
    # snapshot: see chatd/migrations/0003_snapshot_function.sql.
    rows = await pool.fetch(
        "SELECT a.n, s.* FROM unnest($2::bigint[]) WITH ORDINALITY AS a(after, n), "
        "LATERAL chatd_snapshot($1, a.after, $3, $4, $5) AS s ORDER BY a.n, s.seq",
        conv,
        afters,
        limit,
        max_catchup,
        streams,
    )
    by_join: list[list[asyncpg.Record]] = [[] for _ in afters]
    for r in rows:
        by_join[r["n"] - 1].append(r)
    out = []
    for group in by_join:
        first = group[0]
        messages = [message_dict(r) for r in group if r["seq"] is not None]
        out.append(
            Snapshot(
                messages, first["head"], first["recovered"], frozenset(first["committed_streams"])
            )
        )
    return out


async def _aio_after(pool: asyncpg.Pool, conv: str, after: int, limit: int) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM messages WHERE conv_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        conv,
        after,
        limit,
    )
    return [message_dict(r) for r in rows]


async def _aio_history(
    pool: asyncpg.Pool, conv: str, before: int | None, limit: int
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {_COLUMNS} FROM messages WHERE conv_id = $1 AND seq < $2 "
        "ORDER BY seq DESC LIMIT $3",
        conv,
        before if before is not None else 2**62,
        limit,
    )
    return [message_dict(r) for r in reversed(rows)]


async def _aio_stats(pool: asyncpg.Pool) -> dict[str, Any]:
    row = await pool.fetchrow(
        "SELECT count(*) AS outbox, "
        "coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest "
        "FROM outbox"
    )
    return {"outbox_rows": row["outbox"], "outbox_oldest_s": round(row["oldest"], 3)}


async def _aio_close_pool(pool: asyncpg.Pool) -> None:
    await pool.close()


class Store:
    """Postgres access for the rest of chatd. Every call crosses through the gateway."""

    def __init__(self, gateway: Gateway, pool: asyncpg.Pool, config: Config) -> None:
        self.gateway = gateway
        self.pool = pool
        self.config = config
        # None is a wake-up: there are published outbox rows to delete.
        self._send, self._receive = trio.open_memory_channel[_Pending | None](
            max(1024, config.store.group_commit_max * 4)
        )
        #: Messages committed and batches run, for the status op and benchmarks.
        self.committed = 0
        self.batches = 0
        #: Called with every commit's new outbox rows, in commit order (the relay's
        #: ``offer``). Must not block: it runs on the committer's path.
        self.on_committed: Callable[[list[OutboxEvent]], None] | None = None
        #: Set by the relay while it cannot publish: commits then NOTIFY every relay.
        self.notify_relays = False
        self._published: list[int] = []

    def mark_published(self, ids: list[int]) -> None:
        """Outbox rows ``ids`` are published: delete them with the next commit."""
        was_empty = not self._published
        self._published.extend(ids)
        if len(self._published) > _MAX_PUBLISHED:
            del self._published[: len(self._published) - _MAX_PUBLISHED]
        if was_empty:
            try:
                self._send.send_nowait(None)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # the committer is busy (it will take them) or gone

    # -- writes -----------------------------------------------------------

    async def submit(
        self, msg: NewMessage, on_done: Callable[[Committed | ChatdError], None]
    ) -> None:
        """Queue ``msg`` for the group committer; ``on_done`` gets the outcome.

        Submission order is commit order: sends queued in order by one caller
        get increasing seqs within a conversation.
        """
        pending = _Pending(msg, on_done)
        # The committer's queue is rarely full: skip the scheduler round when it isn't.
        # (A waiting sender keeps its place: send() queues behind earlier waiters.)
        try:
            self._send.send_nowait(pending)
        except trio.WouldBlock:
            await self._send.send(pending)

    async def send(self, msg: NewMessage) -> Committed:
        """Commit one message and wait for the outcome (raises on failure)."""
        done = trio.Event()
        box: list[Committed | ChatdError] = []

        def _on_done(result: Committed | ChatdError) -> None:
            box.append(result)
            done.set()

        await self.submit(msg, _on_done)
        await done.wait()
        if isinstance(box[0], ChatdError):
            raise box[0]
        return box[0]

    async def run_committer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The group commit loop; owned by the server's nursery."""
        window = self.config.store.group_commit_window_ms / 1000.0
        limit = self.config.store.group_commit_max
        task_status.started()
        try:
            while True:
                first = await self._receive.receive()
                if first is None:
                    # Published rows to delete: a send coming soon carries the delete.
                    with trio.move_on_after(_FLUSH_AFTER):
                        first = await self._next_pending()
                    if first is None:
                        if self._published:
                            await self._commit_bounded([])
                        continue
                batch = [first]
                if window > 0:
                    with trio.move_on_after(window):
                        while len(batch) < limit:
                            batch.append(await self._next_pending())
                while len(batch) < limit:
                    try:
                        item = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if item is not None:
                        batch.append(item)
                await self._commit_bounded(batch)
        finally:
            self._fail_queued(StoreUnavailable("server is shutting down"))
            if self._published:
                # Else another relay republishes them later: harmless, but noisy.
                with trio.move_on_after(1.0, shield=True):
                    await self._commit([])

    async def _next_pending(self) -> _Pending:
        while (item := await self._receive.receive()) is None:
            pass
        return item

    async def _commit_bounded(self, batch: list[_Pending]) -> None:
        # A batch that started committing finishes (bounded) even on shutdown,
        # so no sender is left without an answer.
        with trio.move_on_after(self.config.postgres.command_timeout + 1.0, shield=True):
            await self._commit(batch)

    def _fail_queued(self, err: ChatdError) -> None:
        while True:
            try:
                pending = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.ClosedResourceError, trio.EndOfChannel):
                return
            if pending is not None:
                pending.on_done(err)

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            results = await self._call_commit([p.msg for p in batch], carry=True)
        except StoreUnavailable as exc:
            log.warning("commit of %d message(s) failed: %s", len(batch), exc)
            err = StoreUnavailable(
                f"{exc.message}; the outcome may be unknown: retry with the same id"
            )
            for p in batch:
                p.on_done(err)
            return
        except StoreError as exc:
            if len(batch) > 1:
                # One bad message must not fail its neighbours: retry them alone.
                for p in batch:
                    await self._commit([p])
                return
            log.error("commit rejected: %s", exc)
            if batch:
                batch[0].on_done(exc)
            return
        if batch:
            self.batches += 1
        for p, result in zip(batch, results, strict=True):
            if not result.duplicate:
                self.committed += 1
            p.on_done(result)

    async def _call_commit(self, msgs: list[NewMessage], *, carry: bool) -> list[Committed]:
        """One ``chatd_commit`` round trip; hands the new outbox rows to ``on_committed``.

        ``carry``: also delete the outbox rows reported published (the committer's
        calls only, so a reply's commit never waits on them).
        """
        published: list[int] = []
        if carry:
            published, self._published = self._published, []
        try:
            results, events = await self.gateway.postgres(
                _aio_commit_batch, self.pool, msgs, published, self.notify_relays
            )
        except BaseException:
            self._published[:0] = published  # not deleted: the next commit carries them
            raise
        if events and self.on_committed is not None:
            self.on_committed(events)
        return results

    async def commit_one(self, msg: NewMessage) -> Committed:
        """Commit ``msg`` now, in its own transaction, bypassing the group committer.

        For a reply's final commit: it must not depend on the committer task,
        which may already be gone when a shielded commit runs during shutdown.
        """
        results = await self._call_commit([msg], carry=False)
        if not results[0].duplicate:
            self.committed += 1
        return results[0]

    # -- reads ------------------------------------------------------------

    async def snapshot(
        self, conv: str, after: int | None, streams: list[str] | None = None
    ) -> Snapshot:
        """Messages after ``after`` (all of them, if at most ``max_catchup``) or the latest N.

        ``streams``: in-flight reply ids; those already committed are reported.
        """
        return (await self.snapshots(conv, [after], streams))[0]

    async def snapshots(
        self, conv: str, afters: list[int | None], streams: list[str] | None = None
    ) -> list[Snapshot]:
        """:meth:`snapshot` for each of ``afters``, consistent, in one round trip."""
        cfg = self.config.store
        return await self.gateway.postgres(
            _aio_snapshots,
            self.pool,
            conv,
            afters,
            cfg.snapshot_messages,
            cfg.max_catchup,
            streams or [],
        )

    async def after(self, conv: str, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` messages with seq > ``after``, in seq order."""
        return await self.gateway.postgres(_aio_after, self.pool, conv, after, limit)

    async def history(self, conv: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` messages with seq < ``before``, in seq order."""
        return await self.gateway.postgres(_aio_history, self.pool, conv, before, limit)

    async def stats(self) -> dict[str, Any]:
        return await self.gateway.postgres(_aio_stats, self.pool)


async def _connect_with_retry(gateway: Gateway, config: Config) -> asyncpg.Pool:
    # A server that is still starting (or briefly down) is waited for, within a bound.
    deadline = trio.current_time() + max(config.postgres.connect_timeout, 1.0) * 3
    delay = 0.1
    while True:
        try:
            return await gateway.postgres(
                _aio_create_pool, config, deadline=config.postgres.connect_timeout * 2
            )
        except StoreUnavailable as exc:
            if trio.current_time() + delay > deadline:
                raise StoreUnavailable(f"cannot connect to Postgres: {exc.message}") from exc
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)


@asynccontextmanager
async def open_store(
    gateway: Gateway, config: Config, *, migrate: bool = True
) -> AsyncIterator[Store]:
    """Open the Postgres pool (and apply migrations) for the lifetime of the server."""
    pool = await _connect_with_retry(gateway, config)
    try:
        if migrate:
            applied = await gateway.postgres(schema.apply, pool, deadline=60.0)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        yield Store(gateway, pool, config)
    finally:
        with trio.move_on_after(5.0, shield=True):
            try:
                await gateway.postgres(_aio_close_pool, pool, deadline=5.0)
            except StoreUnavailable as exc:
                log.warning("Postgres pool did not close cleanly: %s", exc)


__all__ = [
    "Committed",
    "NewMessage",
    "OutboxEvent",
    "Snapshot",
    "Store",
    "StoreError",
    "message_dict",
    "message_event",
    "open_store",
]
