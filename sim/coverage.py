"""Which of the engine's recovery paths a simulated run reached.

Each path is read off the counters every engine keeps for its operators
(``Engine.status``); a run's coverage is the sum over every process it ran,
the crashed ones included. CI fails if its budget leaves a path unreached.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from chatd.engine.engine import Engine

#: path -> what it is. The simulation's budget must reach every one.
PATHS = {
    "gap_fill": "a feed read missing seqs from the log (a lost or late publish)",
    "resync_retry": "a feed's re-read of its conversation failed and was retried",
    "reply_gap_fill": "a feed re-read a reply's partial (a lost delta)",
    "sweep_publish": "the relay's sweep published a row its committer did not",
    "publish_failure": "a publish failed; its rows were left to the sweep",
    "pubsub_reconnect": "the pub/sub subscription started over (Redis restarted or cut)",
    "orphan_takeover": "a process took over a reply whose owner's lease lapsed",
    "fenced": "a process found its lease lost and gave up its replies",
    "interrupted": "a reply was committed as interrupted",
    "commit_retry": "a reply's final commit was retried through an outage",
    "lane_failure": "a batch of deltas failed to reach Redis and was retried",
    "duplicate_send": "a resent message id was answered with its original seq",
    "owed_reply": "a retried send started the reply its first try could not",
    "vanished_reply": "a reply ended unseen (pub/sub cut); its followers got the end",
    "slow_consumer": "a client that stopped reading was closed (4008) and resumed",
    "paged_catchup": "a reconnect's catch-up came in pages (snapshots with more)",
    "access_refused": "an op without the right to it was refused (forbidden)",
    "access_revoked": "a revoked member's live subscription was ended",
}


def of_engine(engine: Engine) -> Counter[str]:
    hub, replies, relay = engine.hub, engine.replies, engine.relay
    return Counter(
        {
            "gap_fill": hub.counters.gap_fills,
            "resync_retry": hub.counters.resync_retries,
            "reply_gap_fill": hub.counters.stream_fills,
            "sweep_publish": relay.published,
            "publish_failure": relay.publish_failures,
            # The first connect is not a recovery.
            "pubsub_reconnect": max(0, hub.pubsub_connects - 1),
            "orphan_takeover": replies.runner.takeovers,
            "fenced": replies.custody.fenced,
            "interrupted": replies.runner.interrupted,
            "commit_retry": replies.runner.commit_retries,
            # Rarer than a generated budget reaches (a commit's answer lost,
            # then its lease): counted, not required; a pinned program has it.
            "found_stored": replies.runner.found_stored,
            "lane_failure": replies.lane.failures,
            "duplicate_send": engine.committer.duplicates,
            "owed_reply": replies.owed.paid,
            "vanished_reply": hub.counters.vanished_replies,
            "slow_consumer": engine.counters.slow_disconnects,
            "access_refused": sum(
                n for (_, code), n in engine.counters.ops.items() if code == "forbidden"
            ),
            "access_revoked": engine.counters.revoked_subscriptions,
        }
    )


def of_engines(engines: Iterable[Engine]) -> Counter[str]:
    total: Counter[str] = Counter()
    for engine in engines:
        total.update(of_engine(engine))
    return total
