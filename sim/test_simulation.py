"""The simulator in CI: thousands of interleavings on the memory adapters, every
invariant checked after each, every recovery path reached, runs reproducible.

``SIM_EXAMPLES`` sets the budget (``python -m sim run`` for long runs).
"""

from __future__ import annotations

import os

import pytest

from chatd.adapters.memory_log import MemoryDatabase
from fuzz.program import (
    Break,
    Heal,
    KillPeer,
    PausePeer,
    PeerReply,
    Reconnect,
    Reply,
    Send,
    Slow,
    Stop,
    Wait,
)
from sim.coverage import PATHS
from sim.parallel import default_workers, explore_parallel, shares
from sim.runner import simulate
from sim.session import explore
from sim.world import Burst, Intrude, LoseAnswers, LosePubsub, Member, RestartRedis, Stall

EXAMPLES = int(os.environ.get("SIM_EXAMPLES", "10000"))
#: Explorer processes sharing the budget (SIM_WORKERS; default: every core, at most 8).
WORKERS = default_workers()

#: Programs that once failed, with the seed that made them fail.
PINNED = [
    # A taker could not seize the partial (its Redis blipped) and committed the
    # older checkpoint: shorter than what a watcher had already been shown.
    # Fixed: a takeover waits for Redis (bounded) before settling for less.
    (
        [
            PeerReply(conv=0, tokens=21),
            Wait(ms=137),
            PausePeer(ms=750),
            Wait(ms=65),
            Wait(ms=400),
            Break(component="postgres", ms=201),
            Reconnect(c=0),
            Break(component="redis", ms=199),
        ],
        0,
    ),
    # A reply the model failed ended while a watcher's pub/sub was cut: its
    # stream.error was lost and the watcher never learned the reply ended.
    # Fixed: a resync ends replies that left the log unseen (code "ended").
    (
        [
            Reply(c=1, conv=1, tokens=8, fail_at=10),
            Reconnect(c=0),
            Send(c=2, conv=1),
            LosePubsub(pct=12, ms=50),
            Heal(),
            Send(c=1, conv=0),
            LoseAnswers(pct=55, ms=898),
            Reply(c=1, conv=0, tokens=25, fail_at=2),
        ],
        0,
    ),
    # Found by the intruder: a feed delivered a message it had started reading
    # (a gap fill, Postgres slow) to a client whose subscription had just been
    # revoked, after its "unsubscribed". Fixed: a leave takes effect at once
    # (Join.left), reads in flight skip whoever left.
    (
        [
            Slow(component="postgres", ms=440, latency_ms=66),
            Burst(c=0, conv=1, n=7),
            Member(conv=1, ms=0),
            LosePubsub(pct=27, ms=133),
        ],
        4,
    ),
    # Found after that fix: a subscribe whose join was left (its membership
    # revoked) before its snapshot was never answered. Fixed: it is answered
    # with the error `unsubscribed`.
    (
        [
            Send(c=0, conv=0),
            LoseAnswers(pct=35, ms=50),
            Member(conv=1, ms=0),
            Slow(component="postgres", ms=100, latency_ms=500),
            Intrude(conv=1, op="subscribe"),
        ],
        0,
    ),
    # A harness race: a Reconnect took the stalled watcher's offsets, then (after
    # connecting) its texts, which its old reader had meanwhile grown from
    # frames the closed connection still held. Fixed: both taken at once.
    (
        [
            Send(c=0, conv=0),
            PeerReply(conv=0, tokens=6),
            Stall(c=0, ms=250),
            Send(c=0, conv=0),
            Reconnect(c=0),
        ],
        0,
    ),
    # A harness race: the Reconnect step's own close of a watcher was taken for
    # the server dropping it, and the watcher reconnected twice.
    (
        [
            Reconnect(c=0),
            PeerReply(conv=0, tokens=2),
            Slow(component="postgres", ms=100, latency_ms=41),
            Wait(ms=51),
            Send(c=0, conv=0),
            KillPeer(),
            Reconnect(c=0),
        ],
        0,
    ),
    # A check judged a reply taken over from the chatd under test before that
    # process had noticed it was fenced: its heartbeat, slowed past the lease,
    # answered more than the one lease the check waited. Fixed: the check
    # waits until every process has renewed its lease after the faults.
    (
        [
            KillPeer(),
            Break(component="postgres", ms=50),
            Reconnect(c=0),
            Reply(c=0, conv=0, tokens=1, fail_at=None),
            Intrude(conv=0, op="subscribe"),
            Slow(component="postgres", ms=134, latency_ms=1067),
        ],
        0,
    ),
    # The chatd under test lost its lease while a reply's registration answer
    # was lost (the row had landed); the taker knew none of it and ended it
    # with nothing stored; the reply, registered again under the new id, was
    # stored complete. Fixed: such a reply is abandoned at the fence (nothing
    # stored, stream.error), as its taker ends it. With the senders connected
    # on first use, the same program caught the abandoning itself: the reply's
    # final commit had landed with its answer lost, and it was still told as
    # nothing stored. Fixed: an owner whose commit's outcome is unknown looks
    # the reply up before it gives it up (tests/test_takeover.py has it too).
    (
        [
            Break(component="postgres", ms=50),
            Reconnect(c=0),
            Reply(c=0, conv=0, tokens=1, fail_at=None),
            Reply(c=0, conv=0, tokens=1, fail_at=None),
            KillPeer(),
            Slow(component="postgres", ms=134, latency_ms=667),
            Reconnect(c=0),
            LoseAnswers(pct=57, ms=117),
            Reply(c=0, conv=0, tokens=12, fail_at=None),
        ],
        0,
    ),
    # The peer, paused past its lease, finished its reply meanwhile; the taker
    # knew none of its text, stored nothing and told followers "interrupted";
    # the peer, waking, committed the reply complete anyway. Fixed: a reply's
    # commit is refused once its process is declared dead (ReplyTaken).
    (
        [
            PeerReply(conv=1, tokens=18),
            Member(conv=1, ms=500),
            PausePeer(ms=1514),
            Reconnect(c=1),
        ],
        0,
    ),
    # A reply the model failed ended with nothing stored, but Postgres was
    # down, so its row was not dropped; its process's lease lapsed, and its
    # own orphan sweep declared it dead and took the row over (committed
    # interrupted). Fixed: only a live process takes orphans over, and a
    # fenced process still drops what it ended unstored, never taking it.
    (
        [
            Send(c=0, conv=0),
            Send(c=0, conv=0),
            Send(c=0, conv=0),
            Send(c=0, conv=0),
            Send(c=0, conv=0),
            Reply(c=0, conv=0, tokens=10, fail_at=10),
            Break(component="postgres", ms=1001),
            Stall(c=0, ms=801),
        ],
        0,
    ),
    # The same with a live peer: the peer took the failed reply's row over
    # (the owner, cut off from Postgres, could not drop it) and stored it,
    # though its followers had been told nothing was. Fixed: a reply ends with
    # nothing stored only once its owner dropped its row (the drop is refused
    # if another process holds it: that one ends the reply); the log out of
    # reach, it ends commit_failed, which promises nothing. And a reply that
    # failed at once: its registration, in flight, landed after it ended; the
    # drop now waits for it and knows its owner (second program).
    (
        [
            Reply(c=0, conv=0, tokens=10, fail_at=10),
            Heal(),
            Break(component="postgres", ms=1001),
            PeerReply(conv=0, tokens=1),
            Stall(c=0, ms=800),
        ],
        0,
    ),
    ([Send(c=0, conv=0), Heal(), Reply(c=0, conv=0, tokens=1, fail_at=0)], 0),
]


#: The shrunk programs that caught the planted access bugs (sim/mutations.py):
#: invariant 10 on every CI run, whatever the generated budget reaches.
ACCESS = [
    ([Member(conv=1, ms=0)], 0),  # watch-inverted
    ([Intrude(conv=0, op="subscribe")], 0),  # history-unchecked (the final probe)
    ([PausePeer(ms=100), PeerReply(conv=1, tokens=8), Member(conv=1, ms=0)], 0),
    ([Intrude(conv=1, op=op) for op in ("subscribe", "history", "send", "stop", "typing")], 0),
]


@pytest.mark.parametrize(("program", "seed"), PINNED + ACCESS)
def test_pinned_programs(program, seed):
    simulate(program, seed)


def test_a_reply_stored_by_a_commit_whose_answer_was_lost_is_found():
    # PINNED[7]: the commit landed, its answer was lost, the lease lapsed.
    assert simulate(*PINNED[7])["found_stored"] == 1


def test_generated_interleavings_hold_every_invariant_and_reach_every_path():
    result = explore_parallel(EXAMPLES, WORKERS)
    print(
        f"\n{result.runs} interleavings in {result.seconds:.1f}s ({result.per_second:.0f}/s, "
        f"{WORKERS} workers); "
        f"reached: {dict(result.coverage)}"
    )
    assert result.runs == EXAMPLES
    missing = [path for path in PATHS if not result.coverage[path]]
    assert not missing, f"recovery paths no interleaving reached: {missing}"


def _fingerprint(program, seed):
    """What a run leaves behind: every stored message, and what it covered."""
    captured: list[MemoryDatabase] = []
    original = MemoryDatabase.__init__

    def _capture(self, *args, **kw):
        original(self, *args, **kw)
        captured.append(self)

    MemoryDatabase.__init__ = _capture  # type: ignore[method-assign]
    try:
        covered = simulate(program, seed)
    finally:
        MemoryDatabase.__init__ = original  # type: ignore[method-assign]
    (db,) = captured
    stored = {conv: [dict(m) for m in c.messages] for conv, c in db.convs.items()}
    return stored, dict(covered)


def test_a_run_is_reproducible_from_its_program_and_seed():
    program = [
        Reply(c=0, conv=0, tokens=12),
        PeerReply(conv=1, tokens=20),
        Send(c=1, conv=1),
        Wait(ms=150),
        PausePeer(ms=1400),
        LosePubsub(pct=50, ms=300),
        Stop(c=0, conv=0),
        Send(c=2, conv=0),
        RestartRedis(),
        KillPeer(),
        Reply(c=2, conv=1, tokens=9),
    ]
    first = _fingerprint(program, 7)
    assert first[0], "the run stored messages"
    assert _fingerprint(program, 7) == first
    # Another seed is another interleaving (its ids and timings differ).
    assert _fingerprint(program, 8) != first


def test_workers_split_the_budget_and_sum_what_each_covered():
    # Worker i of n explores the stream of programs seeded seed * n + i: the
    # same two streams explored one after the other cover exactly as much.
    together = explore_parallel(40, 2, seed=3)
    apart = [explore(20, seed=6), explore(20, seed=7)]
    assert together.runs == 40 == sum(a.runs for a in apart)
    assert together.coverage == apart[0].coverage + apart[1].coverage
    assert shares(10_001, 3) == [3334, 3334, 3333]
