"""Custody of replies: leases, checkpoints and takeover, so no reply is orphaned.

Every chatd process has an id and a lease in the log (``chatd_processes``),
renewed every ``lease / 3`` seconds; every reply it generates is registered
under that id (``replies_in_flight``). Four tasks, owned by the replies
service's nursery:

* **registrar**: records the replies that started since its last round, all
  in one round trip, once the lease is held, retrying while the log is
  unavailable. A reply generates meanwhile, but the lane publishes nothing of
  it until it is registered: a reply visible to subscribers always has an
  owner that can be presumed dead, so it can never be orphaned for good (a
  Postgres blip delays a reply's first tokens; it never refuses the reply).

* **heartbeat**: renews the lease. If the log says the lease had lapsed (the
  process was paused, or cut off from Postgres, past ``[streams].lease``),
  this process is *fenced*: its replies may already belong to another
  process, so it gives them all up (they end without a commit or an end
  frame from here) and continues under a new id.
* **checkpoints** (``[streams].persistence = "checkpoint"``): every
  ``checkpoint_interval_ms``, appends what each reply said since the last
  checkpoint, for all replies of the process in one round trip.
* **reaper**: every ``takeover_interval``, takes over the replies of
  processes whose lease lapsed (one statement: two reapers never take the
  same reply) and ends each: committed ``interrupted`` with what is known of
  it (the checkpoint, or the partial in Redis, the longer), then its end.

So a reply whose process dies ends within ``lease + takeover_interval`` (and
one commit), on whichever process is alive, or the same one restarted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from chatd.backoff import Backoff
from chatd.config import RetryConfig, StreamsConfig
from chatd.engine.lane import Lane
from chatd.engine.reply import Reply
from chatd.entropy import token_hex
from chatd.errors import Unavailable
from chatd.ports import Log
from chatd.records import Checkpoint, Orphan, Registration

log = logging.getLogger("chatd.custody")


def _new_id() -> str:
    return token_hex(16)


class Custody:
    def __init__(self, log: Log, cfg: StreamsConfig, retry: RetryConfig, lane: Lane) -> None:
        self._log = log
        self._cfg = cfg
        self._retry = retry
        self._lane = lane
        #: This process's id in the log; a new one after being fenced.
        self.process = _new_id()
        #: Set while the log holds a live lease for ``process``.
        self._leased = trio.Event()
        #: Replies of this process, generating (registered or not yet).
        self.replies: dict[str, Reply] = {}
        self._unregistered: dict[str, Reply] = {}
        self._wanted = trio.Event()
        #: The registrar's round in flight (its replies may land in the log or not).
        self._in_round: set[str] = set()
        self._round_done = trio.Event()
        self._to_drop: dict[str, str] = {}
        self.fenced = 0
        #: Leases renewed (a lost one is noticed, and fenced, before the next counts).
        self.renewals = 0
        self.checkpoints = 0

    def register(self, r: Reply) -> None:
        """``r`` starts: the registrar records it as this process's."""
        self.replies[r.id] = r
        self._unregistered[r.id] = r
        self._wanted.set()

    async def settle(self, r: Reply) -> None:
        """Before ``r`` commits: no registration of it may land after its commit (the
        row would outlive the reply), so a pending one is cancelled, one in flight
        awaited."""
        self._unregistered.pop(r.id, None)
        while r.id in self._in_round:
            await self._round_done.wait()

    def release(self, r: Reply) -> None:
        """``r`` has ended (its commit removed its row)."""
        self.replies.pop(r.id, None)
        self._unregistered.pop(r.id, None)

    async def drop(self, r: Reply) -> bool | None:
        """``r`` ended without a message: its row goes, if this process still holds
        it. True: no row is left; False: another process took it over (that one
        ends it); None: the log did not answer (the heartbeat retries the drop)."""
        self.release(r)
        await self.settle(r)
        if r.owner is None:
            return True  # never registered: there is no row
        self._to_drop[r.id] = r.owner
        try:
            gone = await self._log.drop_reply(r.id, r.owner)
        except Unavailable:
            return None
        self._to_drop.pop(r.id, None)
        return gone

    async def registrar(self) -> None:
        backoff = Backoff.of(self._retry)
        while True:
            await self._wanted.wait()
            await self._leased.wait()
            self._wanted = trio.Event()
            batch = list(self._unregistered.values())
            if not batch:
                continue
            process = self.process
            self._in_round = {r.id for r in batch}
            try:
                await self._log.register_replies(
                    process, [Registration(r.id, r.conv, r.meta_json) for r in batch]
                )
            except Unavailable as exc:
                log.debug("registration of %d repl(ies) postponed: %s", len(batch), exc)
                for r in batch:
                    # Only the answer may have been lost: the row may be there.
                    r.owner = r.owner or process
                self._wanted.set()
                await backoff.sleep()
                continue
            finally:
                self._in_round = set()
                self._round_done.set()
                self._round_done = trio.Event()
            backoff.reset()
            for r in batch:
                # Its row is in the log under ``process`` now, even if the reply
                # ended meanwhile (its drop, waiting for this round, needs to know).
                r.owner = r.owner or process
                if self._unregistered.pop(r.id, None) is not None and process == self.process:
                    r.registered = True
                    r.owner = process
                    self._lane.mark(r)  # what it said meanwhile goes out now

    async def heartbeat(self) -> None:
        period = self._cfg.lease / 3
        while True:
            try:
                alive = await self._log.heartbeat(self.process, self._cfg.lease)
            except Unavailable as exc:
                log.debug("lease not renewed: %s", exc)
            else:
                if not alive:
                    self._fenced()
                    continue  # take a lease under the new id at once
                self.renewals += 1
                self._leased.set()
                await self._drop_forgotten()
            await trio.sleep(period)

    def _fenced(self) -> None:
        self.fenced += 1
        gone = [r for r in self.replies.values() if r.registered or r.id in self._in_round]
        log.warning(
            "this process's lease lapsed (paused or cut off for over %gs): giving up its %d "
            "repl(ies) to the process that takes them over",
            self._cfg.lease,
            len(gone),
        )
        for r in gone:
            r.taken = True
            self.replies.pop(r.id, None)
            self._unregistered.pop(r.id, None)
            if r.scope is not None:
                r.scope.cancel()
        # A registration whose answer was lost may have landed under the lapsed
        # id: a taker may end that reply with nothing stored, and a row
        # registered again under the new id would let it be stored after all.
        for r in self.replies.values():
            if not r.registered and r.owner is not None:
                r.abandoned = True
                self._unregistered.pop(r.id, None)
                if r.scope is not None:
                    r.scope.cancel()
        # Replies the log never heard of are nobody else's: they stay, and are
        # registered under the new id. Rows of replies that ended without a
        # message and could not be dropped yet stay to drop: their followers
        # were told nothing was stored, so no takeover may store them.
        self.process = _new_id()
        self._leased = trio.Event()

    async def _drop_forgotten(self) -> None:
        for stream, owner in list(self._to_drop.items()):
            try:
                await self._log.drop_reply(stream, owner)
            except Unavailable:
                return
            self._to_drop.pop(stream, None)

    async def checkpoint(self) -> None:
        interval = self._cfg.checkpoint_interval_ms / 1000.0
        while True:
            await trio.sleep(interval)
            pieces: list[tuple[Reply, int, Checkpoint]] = []
            for r in self.replies.values():
                n = len(r.parts)
                if r.registered and n > r.checkpointed_parts:
                    text = "".join(r.parts[r.checkpointed_parts : n])
                    pieces.append((r, n, Checkpoint(r.id, r.checkpointed, text)))
            if not pieces:
                continue
            try:
                await self._log.checkpoint(self.process, [p for _, _, p in pieces])
            except Unavailable as exc:
                log.debug("checkpoint postponed: %s", exc)
                continue
            self.checkpoints += 1
            for r, n, p in pieces:
                r.checkpointed_parts, r.checkpointed = n, p.old_length + len(p.text)

    async def reap(self, take_over: Callable[[Orphan], Awaitable[bool]]) -> None:
        # Orphans taken but not ended yet (their commit failed): this process owns
        # them now, so nobody else would; they are retried every round.
        pending: list[Orphan] = []
        while True:
            await trio.sleep(self._cfg.takeover_interval)
            try:
                taken = await self._log.take_orphans(self.process)
            except Unavailable as exc:
                log.debug("orphan sweep postponed: %s", exc)
            else:
                held = {o.stream for o in pending} | self._to_drop.keys()
                # One of this process's own, ended with nothing stored, whose
                # row it could not drop before its lease lapsed: it is dropped
                # (the heartbeat does), never taken over.
                pending += [o for o in taken if o.stream not in held]
            pending = [o for o in pending if not await take_over(o)]
