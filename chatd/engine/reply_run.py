"""One reply's life: registered, generated, committed, ended — or taken over.

The reply is registered in the log (owned by this process, under its lease)
before it generates. Its token task appends to its text; the lane ships it.
When generation ends it commits through :meth:`Committer.commit_now`
(shielded, bounded, retried while the log is unavailable), with status
``complete``, ``stopped`` (a user stopped it, or it hit its length) or
``interrupted`` (its server shut down: what it said so far); the same
statement deletes its in-flight row. It ends with ``stream.end`` carrying the
committed seq and status. If the model fails, the partial is discarded and
subscribers get ``stream.error``.

**Takeover and fencing.** A reply whose process died is taken over by another
process (:mod:`chatd.engine.custody`), which commits what is known of it as
``interrupted`` and publishes its end. The reply's id is the idempotency key
of its commit: if its first owner was only paused and wakes to commit, the
commit reports a duplicate, the stored message stays as it is, and the end
frame this owner publishes carries the *stored* status and length. A taker
that knew none of its text stores nothing (its followers get
``stream.error``): then the owner's commit is refused because the log has
declared the owner dead (``ReplyTaken``), and the owner ends nothing. Nothing
is committed twice, no committed text changes, and a reply its followers
were told ended with nothing stored is never stored.

**A commit whose answer was lost** may have stored the reply (and removed its
in-flight row, so no taker will find it). If a later attempt is refused, or
the reply is abandoned meanwhile (its lease lapsed), the owner first looks
the reply up (``Log.find``): found, its end tells the stored message; not
found, nothing was stored; no answer within the commit's bound, it ends
``commit_failed``, which promises neither.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any

import trio

from chatd.backoff import Backoff
from chatd.config import RetryConfig, StreamsConfig
from chatd.engine.committer import Committer
from chatd.engine.custody import Custody
from chatd.engine.hub import Hub
from chatd.engine.lane import Lane
from chatd.engine.reply import Reply
from chatd.errors import (
    BusUnavailable,
    ModelError,
    ReplyTaken,
    StoreError,
    StoreUnavailable,
    Unavailable,
)
from chatd.model import Model, ModelRequest
from chatd.ports import Log, Transport
from chatd.protocol import encode
from chatd.records import NewMessage, Orphan
from chatd.shutdown import ShutdownClock

log = logging.getLogger("chatd.replies")

#: How long a finished reply waits for its last frames to reach the transport.
_END_WAIT = 2.0
#: How long a takeover waits for Redis to answer before it commits an orphan
#: with its checkpoint alone (which may be behind what its clients saw).
_SEIZE_PATIENCE = 30.0


class ReplyRunner:
    def __init__(
        self,
        cfg: StreamsConfig,
        retry: RetryConfig,
        *,
        context_messages: int,
        log: Log,
        transport: Transport,
        committer: Committer,
        hub: Hub,
        lane: Lane,
        model: Model,
        custody: Custody,
        shutdown: ShutdownClock,
    ) -> None:
        self._cfg = cfg
        self._retry = retry
        self._context_messages = context_messages
        self._log = log
        self._transport = transport
        self._committer = committer
        self._hub = hub
        self.lane = lane
        self._model = model
        self._custody = custody
        self._shutdown = shutdown
        self.completed = 0
        self.failed = 0
        self.interrupted = 0
        #: Orphans whose partial could not be seized yet: since when.
        self._unseized: dict[str, float] = {}
        self.commit_retries = 0
        self.takeovers = 0
        #: Replies found stored after their commit's answer was lost and a retry
        #: was refused or given up (``_landed``).
        self.found_stored = 0

    # -- a reply of this process ---------------------------------------------

    async def run(self, r: Reply) -> None:
        """Generate, commit and end ``r``; returns once its end is published (bounded)."""
        end: dict[str, Any] | None = None
        try:
            self._custody.register(r)
            error = await self._generate(r)
            if r.taken:
                return  # another process took it over and ends it
            if r.abandoned:
                end = await self._abandon(r)
            elif error is not None and not r.interrupted:
                log.warning("reply %s in %s failed: %s", r.id, r.conv, error)
                self.failed += 1
                end = await self._unstored_end(r, "model_failed", str(error))
            else:
                r.state = "committing"
                end = await self._commit(r, self._status(r))
        finally:
            r.state = "ended"
            if end is None and not r.taken:
                if r.length == 0:
                    why = "the server stopped before the reply began"
                    end = await self._unstored_end(r, "interrupted", why)
                else:
                    # Cancelled while generating (the server stops at once):
                    # what was said is still committed, within the shutdown's bound.
                    end = await self._commit(r, "interrupted")
            self._custody.release(r)  # taken: its row is its taker's now
            if end is not None and not r.taken:
                await self.finish(r, end)

    async def _abandon(self, r: Reply) -> dict[str, Any] | None:
        """End ``r`` with nothing stored: its custody was lost before the log confirmed it
        (Reply.abandoned). A taker, if any, knew none of it and ends it the same way."""
        log.warning("reply %s lost its custody before it was recorded: ended, not stored", r.id)
        why = "this server lost its lease before the reply was recorded"
        return await self._unstored_end(r, "interrupted", why)

    async def _unstored_end(self, r: Reply, code: str, why: str) -> dict[str, Any] | None:
        """The end of ``r`` stored nowhere, told only once its row is gone: a row
        left behind would let a takeover store what its followers were told was
        not. None: another process took it over (``r.taken``; that one ends it).
        The log unreachable within the bound, it ends ``commit_failed``, which
        promises nothing either way."""
        gone = await self._drop(r)
        if gone is False:
            log.warning("reply %s was taken over before its row was dropped", r.id)
            r.taken = True
            return None
        if gone is None:
            why = f"{why}; its record could not be removed, so it may yet be stored"
            return r.error("commit_failed", why, retryable=True)
        return r.error(code, why, retryable=True)

    async def _drop(self, r: Reply) -> bool | None:
        """No message for ``r``: its row goes (:meth:`Custody.drop`), retried through
        outages within the commit's bound; None if the log never answered."""
        backoff = Backoff.of(self._retry)
        with self._shutdown.shield(self._cfg.commit_timeout):
            while (gone := await self._custody.drop(r)) is None:
                await backoff.sleep()
            return gone
        return None

    @staticmethod
    def _status(r: Reply) -> str:
        if r.interrupted:
            return "interrupted"
        return "stopped" if r.stopped or r.truncated else "complete"

    async def _generate(self, r: Reply) -> ModelError | None:
        error: ModelError | None = None
        try:
            context: list[dict[str, Any]] = []
            if self._model.wants_context and r.source is None:
                context = await self._log.history(r.conv, r.reply_to + 1, self._context_messages)
            request = ModelRequest(r.conv, r.prompt, context)
            with trio.move_on_after(self._cfg.max_duration) as deadline:
                async with trio.open_nursery() as nursery:
                    r.scope = nursery.cancel_scope
                    if r.stopped or r.interrupted or r.taken:
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(self._tokens, r, request)
        except* ModelError as group:
            error = group.exceptions[0]  # type: ignore[assignment]
        except* Unavailable as group:
            error = ModelError(f"cannot read the conversation: {group.exceptions[0]}")
        except* Exception as group:
            # A bug in one reply must not take the server's other replies down.
            log.error("reply %s crashed", r.id, exc_info=group)
            error = ModelError("internal error while generating the reply")
        if error is not None:
            return error
        if deadline.cancelled_caught:
            return ModelError(f"the reply took longer than {self._cfg.max_duration:g}s")
        return None

    async def _tokens(self, r: Reply, request: ModelRequest) -> None:
        room = self._cfg.max_reply_chars
        source = r.source(r) if r.source is not None else self._model.generate(request)
        async with aclosing(source) as tokens:
            async for token in tokens:
                if "\x00" in token:
                    # Postgres cannot store U+0000: a model emitting one must not
                    # make its whole reply uncommittable.
                    token = token.replace("\x00", "\ufffd")
                if r.length + len(token) > room:
                    r.append(token[: room - r.length])
                    r.truncated = True
                    self.lane.mark(r)
                    return
                r.append(token)
                self.lane.mark(r)

    async def _commit(self, r: Reply, status: str) -> dict[str, Any] | None:
        msg = NewMessage(r.conv, r.id, r.user, r.text, role="assistant", status=status)
        backoff = Backoff.of(self._retry)
        with self._shutdown.shield(self._cfg.commit_timeout):
            await self._custody.settle(r)
        last: Exception | None = None
        #: An attempt failed with its outcome unknown (its answer lost after the
        #: statement ran): the reply may be stored, whatever a later attempt hears.
        unknown = False
        # The commit completes even if the server is shutting down, within a bound.
        with self._shutdown.shield(self._cfg.commit_timeout):
            while True:
                if r.abandoned:
                    if unknown and (stored := await self._find(r)) is not None:
                        return self._landed(r, stored)
                    return await self._abandon(r)
                try:
                    committed = await self._committer.commit_now(
                        msg, finished=[r.id], owner=r.owner
                    )
                except ReplyTaken:
                    # Refused now, but an earlier attempt may have landed (its
                    # commit also removed the row a taker would have found).
                    if unknown and (stored := await self._find(r)) is not None:
                        return self._landed(r, stored)
                    if not r.registered:  # maybe never recorded: nobody else may end it
                        return await self._abandon(r)
                    # This process was declared dead meanwhile (paused, cut off
                    # past its lease): the reply is its taker's, which ends it.
                    log.warning("reply %s was taken over before its commit", r.id)
                    r.taken = True
                    return r.error("interrupted", "taken over by another process", retryable=True)
                except StoreUnavailable as exc:
                    last = exc
                    unknown = True
                    self.commit_retries += 1
                    await backoff.sleep()
                    continue
                except StoreError as exc:
                    last = exc
                    break
                stored = committed.message
                if committed.duplicate:
                    # Fenced: another process committed this reply first (it took
                    # it over); the stored message is the truth.
                    log.info("reply %s was committed by its taker (%s)", r.id, stored["status"])
                elif stored["status"] == "interrupted":
                    self.interrupted += 1
                else:
                    self.completed += 1
                return r.end(committed.seq, stored["status"], len(stored["text"]))
        self.failed += 1
        reason = f"{last}" if last else f"no commit within {self._cfg.commit_timeout:g}s"
        log.error("reply %s in %s could not be committed and is lost: %s", r.id, r.conv, reason)
        return r.error("commit_failed", f"the reply could not be stored: {reason}", retryable=True)

    async def _find(self, r: Reply) -> dict[str, Any] | None:
        """The stored message of ``r``, or None: asked until the log answers (the
        caller's shield bounds it; cut short, the reply ends ``commit_failed``,
        which promises nothing either way)."""
        backoff = Backoff.of(self._retry)
        while True:
            try:
                return await self._log.find(r.conv, r.id)
            except StoreUnavailable:
                await backoff.sleep()

    def _landed(self, r: Reply, stored: dict[str, Any]) -> dict[str, Any]:
        """``r``'s commit landed although its answer was lost: the stored message
        is the truth, told as its end."""
        log.warning("reply %s was stored by a commit whose answer was lost", r.id)
        # Its lease may have lapsed meanwhile (fenced: ``taken``), but no taker
        # holds it: that commit removed its row. Its end is this process's to tell.
        r.taken = False
        self.found_stored += 1
        if stored["status"] == "interrupted":
            self.interrupted += 1
        else:
            self.completed += 1
        return r.end(stored["seq"], stored["status"], len(stored["text"]))

    async def finish(self, r: Reply, end: dict[str, Any]) -> None:
        """Publish the end frame after the reply's last delta (bounded, even on shutdown)."""
        r.end_frame = encode(end)
        self.lane.mark(r)
        if self._shutdown.started:
            # This process's own clients are about to be closed: give them the end now.
            self._hub.deliver_local(r.conv, r.end_frame)
        with self._shutdown.shield(_END_WAIT):
            while not r.end_sent:
                if self.lane.alive:
                    await r.flushed.wait()
                    continue
                try:  # the lane is gone (shutdown): one direct attempt
                    await self.lane.send([r])
                except BusUnavailable as exc:
                    log.info("end of reply %s not published: %s", r.id, exc)
                break
        if not r.end_sent:
            # The transport is down: local clients still learn the end (the lane
            # keeps trying to publish it for the others).
            self._hub.deliver_local(r.conv, r.end_frame)

    # -- a reply of a dead process ---------------------------------------------

    async def take_over(self, o: Orphan) -> bool:
        """Commit what is known of an orphan as ``interrupted`` and publish its end;
        False if it could not be committed (it is tried again).

        An orphan nobody kept any text of ends like a reply stopped before it
        began: nothing is stored, its subscribers get ``stream.error``."""
        text = o.text
        try:
            # Seized first, so its old owner, if only paused, can publish no
            # more of it: what the partial holds now is all anyone was sent.
            partial = await self._transport.seize_partial(o.conv, o.stream, self._cfg.partial_ttl)
        except Unavailable:
            # Redis may hold more than the checkpoint (clients may have seen
            # it): try again next round, for a while, before settling for less.
            since = self._unseized.setdefault(o.stream, trio.current_time())
            if trio.current_time() - since < _SEIZE_PATIENCE:
                return False
            partial = None
        self._unseized.pop(o.stream, None)
        if partial is not None and len(partial) > len(text):
            text = partial  # both are prefixes of the same reply: the longer knows more
        meta = o.meta
        r = Reply(
            id=o.stream,
            conv=o.conv,
            reply_to=int(meta.get("reply_to", 0)),
            prompt="",
            user=str(meta.get("user", self._cfg.assistant_user)),
            started_ms=int(meta.get("ts", 0)),
            parts=[text],
            length=len(text),
            state="ended",
            registered=True,
        )
        # Redis holds an unknown part of it: the ending lane op rewrites it whole.
        r.sent_parts, r.sent_offset, r.sent_bytes, r.start_sent = 1, len(text), -1, True
        if text:
            end = await self._commit(r, "interrupted")
            if end is None or end["type"] != "stream.end":
                return False
        else:
            try:
                mine = await self._log.drop_reply(o.stream, self._custody.process)
            except Unavailable:
                return False
            if not mine:
                return True  # taken from this process in turn: its new taker ends it
            why = "the process generating the reply stopped before it said anything"
            end = r.error("interrupted", why, retryable=True)
        self.takeovers += 1
        log.warning(
            "took over reply %s in %s from a dead process (%d characters)",
            o.stream,
            o.conv,
            len(text),
        )
        await self.finish(r, end)
        return True
