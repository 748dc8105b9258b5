"""The ports: the narrow interfaces the engine depends on.

The engine (``chatd.engine``) never imports a driver. It talks to

* a :class:`Log` — the durable log of messages and the outbox (Postgres in
  production, :mod:`chatd.adapters.memory_log` in fast tests),
* a :class:`Transport` — a disposable fan-out and the token lane's partials
  (Redis, or :mod:`chatd.adapters.memory_transport`),
* a :class:`Connection` — one client (a WebSocket, or an in-memory pair),
* a :class:`KeySource` — the keys tokens are verified with.

Every method that does I/O has a deadline inside the adapter and raises only
chatd's own errors: :class:`~chatd.errors.StoreUnavailable` /
:class:`~chatd.errors.BusUnavailable` (retry later; the outcome of a write may
be unknown) or :class:`~chatd.errors.StoreError` (rejected for good). The
contract tests (``tests/test_contract_*.py``) run the same behaviours against
both implementations of each port, so the memory twins cannot drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from chatd.durable.model import Append, AppendPlan, Create, DSError, StreamRow
from chatd.records import (
    BusMessage,
    Checkpoint,
    Committed,
    InFlight,
    LaneOp,
    NewMessage,
    Orphan,
    OutboxEvent,
    Registration,
    Snapshot,
    SnapshotAsk,
)


class Log(Protocol):
    """Postgres's job: the source of truth."""

    async def commit(
        self,
        msgs: Sequence[NewMessage],
        published: Sequence[int],
        notify: bool,
        finished: Sequence[str] = (),
        owner: str | None = None,
    ) -> tuple[list[Committed], list[OutboxEvent]]:
        """Commit ``msgs`` in one transaction, in order; returns one result per message
        and the new outbox rows (duplicates have none).

        Per conversation, seqs continue the conversation's head with no gap. A
        ``client_id`` already stored (or repeated earlier in ``msgs``) commits
        nothing and reports the original as a duplicate. The same transaction
        deletes the outbox rows ``published`` (skipping rows a sweep holds),
        and, when ``notify``, wakes every relay (:meth:`wait_for_notify`).
        One message that cannot be stored fails the whole call with StoreError.
        ``finished``: replies whose in-flight rows go in the same transaction.
        ``owner``: the process those rows were registered under; if it has been
        declared dead (:meth:`take_orphans`), its replies may belong to a taker
        now: nothing is committed and ReplyTaken is raised. The check and the
        commit are atomic with respect to a takeover.
        """
        ...

    async def snapshots(
        self, asks: Sequence[SnapshotAsk], limit: int, max_catchup: int
    ) -> list[list[Snapshot]]:
        """For each ask, one snapshot per cursor, all in one round trip and one
        consistent view: every message after the cursor if at most
        ``max_catchup``, else (or with no cursor) the latest ``limit``. Those of
        the ask's ``streams`` (reply ids) already committed are reported."""
        ...

    async def after(self, conv: str, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` messages with seq > ``after``, in seq order."""
        ...

    async def history(self, conv: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` messages with seq < ``before`` (the latest ones), in seq order."""
        ...

    async def find(self, conv: str, client_id: str) -> dict[str, Any] | None:
        """The message stored under ``client_id`` in ``conv``, if there is one (a
        commit whose answer was lost may have stored it)."""
        ...

    def claim_outbox(
        self, limit: int, min_age: float
    ) -> AbstractAsyncContextManager[list[OutboxEvent]]:
        """Claim up to ``limit`` outbox rows at least ``min_age`` seconds old, in id order.

        Rows another claim holds are skipped. Leaving the block normally deletes
        them; leaving it with an exception puts them back.
        """
        ...

    async def notify_relays(self) -> None:
        """Wake every relay (:meth:`wait_for_notify`), in every process."""
        ...

    async def wait_for_notify(self) -> None:
        """Return when a commit made with ``notify`` (or :meth:`notify_relays`) happened
        since the last return. The caller bounds the wait: it is a wake-up, not a
        guarantee, so relays also poll."""
        ...

    async def vacuum_outbox(self) -> None:
        """Reclaim the space of deleted outbox rows (a no-op where there is none)."""
        ...

    async def stats(self) -> dict[str, Any]:
        """``outbox_rows``, ``outbox_oldest_s`` and ``migrations_pending`` (shipped
        migrations the database lacks), for operators and readiness."""
        ...

    # -- replies in flight (leases, checkpoints, takeover) --------------------

    async def heartbeat(self, process: str, lease: float) -> bool:
        """Renew ``process``'s lease for ``lease`` seconds (register it the first time).
        False: it had expired or was marked dead; the process is fenced."""
        ...

    async def register_replies(self, owner: str, replies: Sequence[Registration]) -> None:
        """Record replies starting, owned by process ``owner``, in one round trip
        (a reply already recorded is left as it is)."""
        ...

    async def checkpoint(self, owner: str, pieces: Sequence[Checkpoint]) -> None:
        """Append each piece to its reply's text, in one round trip; only where the
        reply is still ``owner``'s and holds ``old_length`` code points."""
        ...

    async def take_orphans(self, taker: str) -> list[Orphan]:
        """Mark processes whose lease expired dead, and give every reply a dead process
        owns to ``taker`` (atomically: two takers never get the same reply). The
        replies ``taker`` took before and has not ended yet come back too, so a
        call whose answer was lost loses no reply: the caller skips the ones it
        holds already."""
        ...

    async def inflight(self, convs: Sequence[str]) -> list[list[InFlight]]:
        """Per conversation, its replies in flight with their checkpointed text
        (one round trip for all)."""
        ...

    async def drop_reply(self, stream: str, owner: str) -> bool:
        """A reply ended without a message (its model failed): its row goes, if
        ``owner`` still holds it. True when no row is left (dropped now, or there
        was none); False when another process took it over (it ends the reply)."""
        ...

    # -- memberships ------------------------------------------------------

    async def memberships(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """The rights (``"r"``, ``"w"``, ``"rw"``) of each ``(conv, user)`` that has a
        membership row; pairs without one are absent."""
        ...

    async def set_membership(self, conv: str, user: str, rights: str) -> None:
        """Give ``user`` exactly ``rights`` on ``conv`` (``""``: remove the row)."""
        ...

    async def members(self, conv: str) -> dict[str, str]:
        """Every membership row of ``conv``: user -> rights."""
        ...


class Transport(Protocol):
    """Redis's job: a disposable transport that holds no truth.

    Publishing is at most once: a subscriber that is not connected misses the
    message, and learns it (a ``subscribe`` message) when its subscription is
    live again, so it re-reads what it missed from the :class:`Log`.
    """

    async def publish_events(self, events: Sequence[tuple[str, str]]) -> None:
        """Publish ``(conv, event JSON)`` pairs in order: one message per conversation,
        its events a line each (:func:`chatd.records.join_events`)."""
        ...

    async def publish(self, conv: str, data: str) -> None:
        """Publish one ephemeral event (typing)."""
        ...

    async def publish_control(self, data: str) -> None:
        """A message to every chatd process (stop a reply running elsewhere)."""
        ...

    async def lane(self, ops: Sequence[LaneOp], ttl: int) -> list[int]:
        """Apply each op atomically: extend the reply's partial (or rewrite it whole
        when the transport does not hold ``expect_bytes``), refresh its TTL, record
        or (``meta == ""``) delete it, publish its frames. Returns each partial's
        UTF-8 length afterwards, or -2 where the reply was seized (nothing done,
        unless the op ends the reply)."""
        ...

    async def read_streams(self, convs: Sequence[str]) -> list[list[InFlight]]:
        """Per conversation, its in-flight replies with their partial text (each
        conversation read atomically; one round trip for all)."""
        ...

    async def read_partial(self, conv: str, stream: str) -> str | None: ...

    async def seize_partial(self, conv: str, stream: str, ttl: int) -> str | None:
        """Take a reply over: its partial now (None if there is none), and from now on
        (for ``ttl`` seconds) the lane refuses its old owner's ops except its end."""
        ...

    async def stream_exists(self, conv: str, stream: str) -> bool: ...

    def want(self, conv: str) -> None:
        """Local subscribers want ``conv``'s events: subscribe soon (never blocks)."""
        ...

    def unwant(self, conv: str) -> None:
        """No local subscriber wants ``conv`` any more."""
        ...

    async def receive(self, wait: float) -> list[BusMessage]:
        """Apply wanted (un)subscriptions, then return what arrived, waiting up to
        ``wait`` seconds for the first message. One caller at a time."""
        ...

    async def ping(self) -> bool: ...


class StreamStore(Protocol):
    """Durable Streams' storage (Postgres, or :mod:`chatd.adapters.memory_durable`).

    Each method is atomic; the protocol's refusals are raised as
    :class:`~chatd.durable.model.DSError` (404 missing or expired, 410
    deleted with forks alive, 409, 400), outages as ``StoreUnavailable``.
    ``now`` is wall-clock seconds (TTLs and expiry times are wall-clock).
    """

    async def create(self, path: str, req: Create, now: float) -> tuple[bool, StreamRow]:
        """Create the stream (True), or find it with the same configuration (False)."""
        ...

    async def append_many(
        self, items: Sequence[tuple[str, Append]], now: float
    ) -> list[AppendPlan | DSError]:
        """Apply :func:`~chatd.durable.model.plan_append` to each ``(path, append)``
        in order, all in one atomic step (a group commit); per item its plan, or
        the protocol's refusal (which changes nothing)."""
        ...

    async def head(self, path: str, now: float) -> StreamRow: ...

    async def read(
        self, path: str, pos: int | None, max_bytes: int, now: float
    ) -> tuple[StreamRow, list[tuple[int, int, bytes]]]:
        """The stream and its chunks from position ``pos`` (None: the tail), the
        first cut to start there, about ``max_bytes`` in all; renews a TTL."""
        ...

    async def delete(self, path: str, now: float) -> None: ...

    async def sweep(self, now: float) -> int:
        """Delete expired streams; how many."""
        ...


class Connection(Protocol):
    """One client's connection, as a session sees it."""

    #: The peer's address, for logs and per-address limits.
    remote: str

    async def get_message(self) -> str | bytes:
        """The next message; raises :class:`ConnectionGone` once the client left."""
        ...

    async def send_frames(self, frames: list[str]) -> None:
        """Send text frames, in order (one write); raises :class:`ConnectionGone`."""
        ...

    async def aclose(self, code: int, reason: str) -> None:
        """Close with ``code`` (at most a short bounded wait for the peer)."""
        ...

    async def abort(self) -> None:
        """Drop the connection without a close frame (the stream is unusable)."""
        ...

    async def ping(self) -> None:
        """Ping the peer and return once it answered (the caller bounds the wait)."""
        ...

    @property
    def is_closed(self) -> bool: ...


class KeySource(Protocol):
    """Where token signatures are checked against: a secret, a public key, or a JWKS."""

    async def key(self, kid: str | None, alg: str) -> Any:
        """The key verifying a token whose header names ``kid`` and ``alg``; raises
        :class:`chatd.tokens.TokenError` if there is none."""
        ...


class ConnectionGone(Exception):
    """The client's connection is closed; nothing more can be sent or received."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason
