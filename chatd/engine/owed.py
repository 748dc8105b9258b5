"""Replies owed: sends that asked for a reply and were committed without one starting.

A send's commit can end with its outcome unknown (the connection to Postgres
broke after the statement ran): the client is answered ``unavailable`` and
retries with the same id, which is then a duplicate. A duplicate never
starts a reply (the first try did), so that reply would never come. The same
holds for a reply refused at a limit (``too_many_streams``, retryable): the
message committed, and a retry of it is a duplicate.

So each process remembers, for a while, the sends it answered without
starting their reply; a retry of one that turns out to be a duplicate starts
it then, once. Only the process that answered knows: a retry that lands on
another process gets its duplicate ack without a reply, as before. The
record is bounded in entries and in age, so a client that never retries
costs nothing for long.
"""

from __future__ import annotations

from collections import OrderedDict

import trio

from chatd.engine import answers
from chatd.errors import Unavailable
from chatd.records import Outcome

#: At most this many sends are remembered (the oldest are forgotten first).
_LIMIT = 10_000
#: A retry later than this after its answer starts no reply.
_TTL = 600.0


class OwedReplies:
    def __init__(self, limit: int = _LIMIT, ttl: float = _TTL) -> None:
        self._limit = limit
        self._ttl = ttl
        self._owed: OrderedDict[tuple[str, str], float] = OrderedDict()
        #: Replies started by a retry (``status`` and metrics).
        self.paid = 0

    def settle(self, outcome: Outcome) -> bool:
        """Keep the books for the answer to a send that asked for a reply: True
        for a retry whose first try's reply never started (start it now; its
        ack says ``duplicate`` and names the reply)."""
        msg, result = outcome.msg, outcome.result
        if isinstance(result, Unavailable):
            self.owe(msg.conv, msg.client_id)  # it may have committed
        elif answers.retries_a_reply(outcome):
            return self.collect(msg.conv, msg.client_id)
        elif not isinstance(result, Exception):
            self._owed.pop((msg.conv, msg.client_id), None)  # it starts its own reply
        return False

    def owe(self, conv: str, msg_id: str) -> None:
        """The send ``msg_id`` in ``conv`` may have committed without its reply starting."""
        key = (conv, msg_id)
        self._owed.pop(key, None)
        self._owed[key] = trio.current_time() + self._ttl
        while len(self._owed) > self._limit:
            self._owed.popitem(last=False)

    def collect(self, conv: str, msg_id: str) -> bool:
        """A retry of ``msg_id`` was a duplicate: True (once) if its reply is owed."""
        expires = self._owed.pop((conv, msg_id), None)
        if expires is None or expires < trio.current_time():
            return False
        self.paid += 1
        return True

    def __len__(self) -> int:
        return len(self._owed)
