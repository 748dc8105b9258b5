"""Replies survive their process: leases, takeover, fencing and checkpoints. Engine
tests, on the memory adapters (autojump clock) and on the real servers.

A process is "cut off" by opening its chaos gates for both Postgres and Redis:
it can no longer renew its lease, commit or publish, which is what a paused
(SIGSTOP) or partitioned process looks like to the others. Real SIGKILLs and
SIGSTOPs of real processes are in tests/test_process_faults.py.
"""

from __future__ import annotations

import math

import trio

from chatd.records import NewMessage
from tests.engine_env import Env

FAST = {"lease": 1.0, "takeover_interval": 0.3, "commit_timeout": 5.0}
#: A dead owner's reply must end within lease + takeover interval (+ one commit).
BOUND = FAST["lease"] + FAST["takeover_interval"] + 1.5


def _cut_off(run) -> None:
    run.chaos.break_for("postgres", math.inf)
    run.chaos.break_for("redis", math.inf)


async def _watched_reply(env: Env, streams: dict, model: dict, prompt: str, words: int):
    """Two processes on one log and transport: a reply asked on A and watched
    from B, until the watcher has ``words`` words of it (0: just asked).
    Returns A, B, the conversation, the watcher, the reply's id and its text so far."""
    a = await env.start(streams=streams, model=model)
    b = await env.start(streams=streams, model=model)
    conv = env.conv()
    watcher = await b.connect("watcher")
    await watcher.subscribe(conv)
    asker = await a.connect("asker")
    stream = (await asker.send_reply(conv, "q", prompt))["stream"]
    text = ""
    while words and len(text.split(" ")) < words:
        f = await watcher._next_stream_frame(conv, stream, 10)
        if f["type"] == "delta":
            text += f["text"]
    return a, b, conv, watcher, stream, text


async def _assistant(run, conv: str) -> list[dict]:
    return [m for m in await run.engine.log.after(conv, 0, 100) if m["role"] == "assistant"]


async def test_a_cut_off_processs_reply_is_taken_over_and_ends_everywhere(env: Env, clock):
    model = {"fake_tokens": 400, "fake_token_rate": 20.0}
    a, b, conv, watcher, stream, text = await _watched_reply(env, FAST, model, "long", 10)
    _cut_off(a)
    t0 = trio.current_time()
    end = await watcher.expect("stream.end", stream=stream, timeout=10)
    took = trio.current_time() - t0
    assert end["status"] == "interrupted"
    assert took <= BOUND, f"ended {took:.1f}s after its owner was cut off (bound {BOUND}s)"
    (row,) = await _assistant(b, conv)
    assert row["id"] == stream and row["status"] == "interrupted"
    assert row["text"].startswith(text[: len(row["text"])]) or text.startswith(row["text"])
    # (>= 1: on the real servers, orphans other tests left in the shared database count too.)
    assert b.engine.replies.runner.takeovers >= 1
    # Nobody sees it in flight any more.
    late = await b.connect("late")
    snap = await late.subscribe(conv)
    assert snap["streams"] == [] and [m["id"] for m in snap["messages"]][-1] == stream
    assert (await b.engine.log.inflight([conv]))[0] == []
    # The owner comes back: fenced, it gives the reply up; no second message.
    a.chaos.heal()
    with trio.fail_after(10):
        while a.engine.replies.custody.fenced < 1:
            await trio.sleep(0.1)
    with trio.fail_after(10):
        while a.engine.replies.active:
            await trio.sleep(0.1)
    await trio.sleep(1)
    rows = await _assistant(b, conv)
    assert [(r["id"], r["status"], r["text"]) for r in rows] == [
        (stream, "interrupted", row["text"])
    ]


async def test_a_late_commit_by_a_fenced_owner_changes_nothing(env: Env, clock):
    """The rule: a reply's id is the idempotency key of its commit. The first
    commit wins; a later one (its owner woke after the takeover) is a duplicate
    and reports the stored message."""
    run = await env.start(streams=FAST)
    conv = env.conv()
    committer = run.engine.committer
    first = NewMessage(
        conv, "~x1", "assistant", "what the taker knew", role="assistant", status="interrupted"
    )
    late = NewMessage(conv, "~x1", "assistant", "the whole reply, later", role="assistant")
    taken = await committer.commit_now(first, finished=["~x1"])
    again = await committer.commit_now(late, finished=["~x1"])
    assert not taken.duplicate and again.duplicate
    assert (
        again.message["text"] == "what the taker knew" and again.message["status"] == "interrupted"
    )
    assert [m["text"] for m in await _assistant(run, conv)] == ["what the taker knew"]


async def test_checkpoints_survive_the_owner_and_redis_lost_together(env: Env, clock):
    streams = {**FAST, "persistence": "checkpoint", "checkpoint_interval_ms": 50.0}
    model = {"fake_tokens": 400, "fake_token_rate": 40.0}
    a, b, conv, watcher, stream, text = await _watched_reply(env, streams, model, "long", 30)
    await trio.sleep(0.2)  # a checkpoint or two since
    held = {f.stream: f.text for f in (await b.engine.log.inflight([conv]))[0]}
    assert len(held[stream]) > 0, "the partial is in Postgres as it generates"
    _cut_off(a)
    await _lose_redis(env, b)
    end = await watcher.expect("stream.end", stream=stream, timeout=10)
    assert end["status"] == "interrupted"
    (row,) = await _assistant(b, conv)
    assert len(row["text"]) >= len(held[stream]), "at least everything checkpointed"
    full = row["text"] if len(row["text"]) > len(text) else text
    assert full.startswith(row["text"]) and full.startswith(text), "one reply's prefixes"


async def _lose_redis(env: Env, run) -> None:
    """Redis comes back empty: every partial and subscription is gone."""
    if env.kind == "memory":
        env.broker.restart()
        return
    tr = run.engine.transport
    await tr.bridge.redis(lambda client: client.flushall(), tr.client)


async def test_a_joiner_gets_the_checkpoint_when_redis_lost_the_partial(env: Env, clock):
    streams = {**FAST, "persistence": "checkpoint", "checkpoint_interval_ms": 50.0}
    run = await env.start(streams=streams, model={"fake_tokens": 200, "fake_token_rate": 40.0})
    conv = env.conv()
    asker = await run.connect("asker")
    stream = (await asker.send_reply(conv, "q", "long"))["stream"]
    await trio.sleep(1.0)
    await _lose_redis(env, run)
    joiner = await run.connect("joiner")
    snap = await joiner.subscribe(conv)
    (inflight,) = [s for s in snap["streams"] if s["stream"] == stream]
    assert inflight["offset"] == 0 and len(inflight["text"]) > 0, "from the checkpoint"
    final, end = await joiner.follow(conv, stream, have=inflight["text"], timeout=20)
    assert end["type"] == "stream.end"
    # Complete, unless the process itself stalled past its 1 s lease (a busy CI
    # machine): then it was fenced and its reply taken over, as it should be.
    assert end["status"] == "complete" or run.engine.replies.custody.fenced, end
    (row,) = await _assistant(run, conv)
    assert row["text"] == final, "checkpoint + tail = the committed reply, no gap, no repeat"


async def test_a_failed_reply_leaves_nothing_to_take_over(env: Env, clock):
    run = await env.start(streams=FAST)
    conv = env.conv()
    viewer = await run.connect("viewer")
    await viewer.subscribe(conv)
    stream = (await viewer.send_reply(conv, "q", "#fail@3"))["stream"]
    end = await viewer.expect("stream.error", stream=stream)
    assert end["code"] == "model_failed"
    with trio.fail_after(5):
        while (await run.engine.log.inflight([conv]))[0]:
            await trio.sleep(0.1)
    assert await _assistant(run, conv) == [], "a failed reply is never stored"


async def test_a_reply_is_published_only_once_the_log_knows_its_owner(env: Env, clock):
    """Registration is batched and retried in the background: a slow Postgres
    delays a reply's first delta, never refuses the reply, and nothing is
    published before the reply has an owner the log knows (else a crash in
    between would leave subscribers with a reply nobody can take over)."""
    # A lease long enough that the slow log does not fence the process.
    streams = {**FAST, "lease": 3.0}
    run = await env.start(streams=streams, model={"fake_tokens": 40, "fake_token_rate": 20.0})
    conv = env.conv()
    watcher = await run.connect("watcher")
    await watcher.subscribe(conv)
    asker = await run.connect("asker")
    # Every Postgres call takes 0.6 s more for a while: the prompt's commit, then
    # the registration, while the reply generates at 20 tokens/s.
    run.chaos.break_for("postgres", 2.0, latency=0.6)
    stream = (await asker.send_reply(conv, "q", "slow log"))["stream"]
    first = await watcher._next_stream_frame(conv, stream, 10)
    assert first["type"] == "stream.start"
    r = run.engine.replies.active[stream]
    assert r.registered, "published before the log knew its owner"
    text, end = await watcher.follow(conv, stream, timeout=20)
    assert end["type"] == "stream.end" and end["status"] == "complete"
    (row,) = await _assistant(run, conv)
    assert row["text"] == text and len(text.split(" ")) == 40


async def test_an_orphan_that_said_nothing_ends_with_nothing_stored(env: Env, clock):
    """Taken over before its first token reached anyone: like a reply stopped before it
    began, it ends with ``stream.error`` and no message (not an empty one)."""
    slow = {"fake_tokens": 5, "fake_token_rate": 0.1}  # the first token after 10 s
    a, b, conv, watcher, stream, _ = await _watched_reply(env, FAST, slow, "slow model", 0)
    start = await watcher._next_stream_frame(conv, stream, 10)
    assert start["type"] == "stream.start"  # registered, and visible
    _cut_off(a)
    end = await watcher._next_stream_frame(conv, stream, BOUND + 1)
    assert end["type"] == "stream.error" and end["code"] == "interrupted", end
    assert await _assistant(b, conv) == []
    assert (await b.engine.log.inflight([conv]))[0] == []


async def test_the_taker_fences_a_live_owner_through_the_transport(env: Env, clock):
    """An owner cut off from Postgres only (its lease lapses, but it still reaches
    Redis and keeps generating): once the taker seized the reply, the owner's
    next lane batch is refused, so it publishes nothing after what the taker
    committed, and it gives the reply up before its heartbeat could tell it."""
    model = {"fake_tokens": 400, "fake_token_rate": 20.0}
    a, b, conv, watcher, stream, text = await _watched_reply(env, FAST, model, "long", 5)
    a.chaos.break_for("postgres", math.inf)
    while True:
        f = await watcher._next_stream_frame(conv, stream, BOUND + 1)
        if f["type"] != "delta":
            break
        text += f["text"]
    assert f["type"] == "stream.end" and f["status"] == "interrupted", f
    (row,) = await _assistant(b, conv)
    assert row["text"].startswith(text), "the taker committed everything anyone was sent"
    with trio.fail_after(2):
        while a.engine.replies.active:
            await trio.sleep(0.05)
    assert a.engine.replies.custody.fenced == 0, "the transport told it, not its lease"
    assert await b.engine.transport.read_partial(conv, stream) is None
    a.chaos.heal()


async def test_a_takeover_whose_answer_was_lost_still_ends_the_reply(env: Env, clock):
    """The takeover statement runs but its answer never comes back: the taker
    holds the reply in the log without knowing it. It must find it again on
    its next round, not leave it in flight forever."""
    from chatd.errors import StoreUnavailable

    model = {"fake_tokens": 400, "fake_token_rate": 20.0}
    a, b, conv, watcher, stream, _ = await _watched_reply(env, FAST, model, "long", 5)
    log = b.engine.replies.custody._log
    take = log.take_orphans
    lost: list[str] = []

    async def _answer_lost(taker: str):
        taken = await take(taker)
        if taken and not lost:
            lost.extend(o.stream for o in taken)
            raise StoreUnavailable("postgres: connection lost after the statement ran")
        return taken

    log.take_orphans = _answer_lost
    _cut_off(a)
    end = await watcher.expect("stream.end", stream=stream, timeout=10)
    assert stream in lost, "the first takeover's answer was lost"
    assert end["status"] == "interrupted"
    (row,) = await _assistant(b, conv)
    assert row["id"] == stream and row["status"] == "interrupted"
    assert (await b.engine.log.inflight([conv]))[0] == []


async def test_a_reply_ended_with_nothing_stored_stays_unstored_when_its_owner_wakes(
    env: Env, clock
):
    """The owner is cut off before any of its reply reached the log or Redis, and
    finishes generating meanwhile. The taker knows none of it: nothing stored,
    ``stream.error``. The owner, healed, retries its commit before its heartbeat
    can tell it it was fenced: refused (the log declared it dead), so a reply
    its followers were told ended with nothing stored is never stored after
    all (found by the simulator)."""
    from chatd.errors import StoreUnavailable

    model = {"fake_tokens": 5, "fake_token_rate": 10.0}  # done 0.5 s in, while cut off
    a, b, conv, watcher, stream, _ = await _watched_reply(env, FAST, model, "short", 0)
    start = await watcher._next_stream_frame(conv, stream, 10)
    assert start["type"] == "stream.start"  # registered under a's lease
    log = a.engine.replies.custody._log
    renew = log.heartbeat

    async def _not_yet(process: str, lease: float) -> bool:
        if a.engine.replies.active:  # the commit goes first
            raise StoreUnavailable("postgres: held back by the test")
        return await renew(process, lease)

    log.heartbeat = _not_yet
    _cut_off(a)
    end = await watcher._next_stream_frame(conv, stream, BOUND + 1)
    assert end["type"] == "stream.error" and end["code"] == "interrupted", end
    a.chaos.heal()
    with trio.fail_after(FAST["commit_timeout"] + 5):
        while a.engine.replies.active:
            await trio.sleep(0.05)
    assert await _assistant(b, conv) == [], "stored after its followers were told nothing was"
    assert (await b.engine.log.inflight([conv]))[0] == []


async def test_a_commit_whose_answer_was_lost_is_told_as_stored_after_a_takeover(env: Env, clock):
    """The owner's final commit lands but its answer is lost; before its retry,
    the owner is cut off past its lease and declared dead, so the retry is
    refused (ReplyTaken). The commit removed the in-flight row, so no taker
    ends the reply: the owner must look it up and end it as stored, not give
    it up (no end at all) or say nothing was stored."""
    from chatd.errors import StoreUnavailable

    model = {"fake_tokens": 6, "fake_token_rate": 20.0}
    a, b, conv, watcher, stream, _ = await _watched_reply(env, FAST, model, "q", 2)
    log = a.engine.log
    commit = log.commit
    lost: list[str] = []

    async def _answer_lost(msgs, published, notify, finished=(), owner=None):
        out = await commit(msgs, published, notify, finished, owner)
        if stream in finished and not lost:
            lost.append(stream)
            _cut_off(a)  # its retry comes after the takeover
            raise StoreUnavailable("postgres: connection lost after the statement ran")
        return out

    log.commit = _answer_lost
    with trio.fail_after(10):
        while not lost:
            await trio.sleep(0.01)
    # Past A's lease and a sweep of B's: A is declared dead (its commit retries
    # fail meanwhile, within [streams].commit_timeout).
    await trio.sleep(FAST["lease"] + 3 * FAST["takeover_interval"] + 0.5)
    a.chaos.heal()
    end = await watcher._next_stream_frame(conv, stream, BOUND + 5)
    while end["type"] == "delta":
        end = await watcher._next_stream_frame(conv, stream, BOUND + 5)
    assert lost == [stream]
    (row,) = await _assistant(b, conv)
    assert (row["id"], row["status"]) == (stream, "complete")
    assert end["type"] == "stream.end", end
    assert (end["seq"], end["status"], end["length"]) == (row["seq"], "complete", len(row["text"]))
    assert a.engine.replies.status()["streams_found_stored"] == 1
