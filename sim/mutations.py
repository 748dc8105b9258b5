"""The simulator's mutation check: plant bugs in a copy of chatd, require each caught.

    .venv/bin/python -m sim.mutations                 # every planted bug
    .venv/bin/python -m sim.mutations gap-off-by-one  # one of them

Each mutant is a bug a careful developer could write, in one of the engine's
modules; three come from the real-server fuzzer's list (``fuzz/mutations.py``),
the rest are the simulator's own (hub and feeds, sessions, relay, replies). For each: copy the project, apply the
patch, run ``python -m sim run`` there with CI's budget and workers, and require a
violation. Prints the time to the first violation and the shrunk program.
Exits 1 if any mutant survives.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.mutations import MUTANTS as FUZZ_MUTANTS
from fuzz.mutations import Mutant
from sim.parallel import default_workers

ROOT = Path(__file__).resolve().parent.parent
#: The budget of CI's simulation test (sim/test_simulation.py).
BUDGET = int(os.environ.get("SIM_EXAMPLES", "10000"))
#: CI's explorer processes, too (``SIM_WORKERS``; default: every core, at most 8).
WORKERS = default_workers()

_FROM_FUZZ = ("publish-aborts-commit", "dedup", "ack-before-commit")

MUTANTS = [m for m in FUZZ_MUTANTS if m.name in _FROM_FUZZ] + [
    Mutant(
        "confirm-no-resync",
        "hub: a subscription confirmation carries no message, so it is ignored "
        "(what was published while the channel was not subscribed is never read)",
        (
            (
                "chatd/engine/hub.py",
                '        if kind == "subscribe":\n            feed.put_member(Resync())\n',
                '        if kind == "subscribe":  # PLANTED\n',
            ),
        ),
    ),
    Mutant(
        "gap-off-by-one",
        "feed: a gap of exactly one missing seq is not filled from the log",
        (
            (
                "chatd/engine/feed.py",
                "        if low < ev.seq - 1:\n",
                "        if low < ev.seq - 2:\n",
            ),
        ),
    ),
    Mutant(
        "resync-gives-up",
        "feed: a resync that failed (the log unavailable) is not tried again",
        (
            (
                "chatd/engine/feed.py",
                "            self.counters.resync_retries += 1\n            self.needs_resync = True\n",
                "            self.counters.resync_retries += 1  # PLANTED\n",
            ),
        ),
    ),
    Mutant(
        "owed-forgotten",
        "replies: a send answered unavailable (its outcome unknown) is not remembered, "
        "so its retry, a duplicate, never starts the reply",
        (
            (
                "chatd/engine/owed.py",
                "            self.owe(msg.conv, msg.client_id)  # it may have committed\n",
                "            pass  # PLANTED\n",
            ),
        ),
    ),
    Mutant(
        "resume-from-zero",
        "feed replies: a resubscribing client's stream offsets are ignored (text repeats)",
        (
            (
                "chatd/engine/feed_replies.py",
                "            offset = join.streams.get(f.stream, 0)\n",
                "            offset = 0  # PLANTED\n",
            ),
        ),
    ),
    Mutant(
        "subscribe-drops-offsets",
        "sessions: the subscribe op does not pass the client's stream offsets on",
        (
            (
                "chatd/engine/ops.py",
                'req.get("after"), req.ref, req.get("streams"))\n',
                'req.get("after"), req.ref, None)  # PLANTED\n',
            ),
        ),
    ),
    Mutant(
        "mark-before-publish",
        "relay: rows are marked published before the publish is known to succeed",
        (
            (
                "chatd/engine/relay.py",
                "            try:\n                await self._transport.publish_events("
                "[(e.conv, e.payload) for e in events])\n            except Unavailable as exc:\n"
                '                log.debug("publish after commit failed',
                "            self._committer.mark_published([e.id for e in events])  # PLANTED\n"
                "            try:\n                await self._transport.publish_events("
                "[(e.conv, e.payload) for e in events])\n            except Unavailable as exc:\n"
                '                log.debug("publish after commit failed',
            ),
        ),
    ),
    Mutant(
        "sweep-swallows-failure",
        "relay: the sweep survives a Redis blip by ignoring the failed publish "
        "(the claimed rows are deleted unpublished)",
        (
            (
                "chatd/engine/relay.py",
                "            if events:\n                await self._transport.publish_events("
                "[(e.conv, e.payload) for e in events])\n",
                "            if events:\n                try:  # PLANTED\n"
                "                    await self._transport.publish_events("
                "[(e.conv, e.payload) for e in events])\n"
                "                except Unavailable:\n                    pass\n",
            ),
        ),
    ),
    Mutant(
        "takeover-complete",
        "replies: a reply taken over from a dead process is committed as complete",
        (
            (
                "chatd/engine/reply_run.py",
                '        if text:\n            end = await self._commit(r, "interrupted")\n',
                '        if text:\n            end = await self._commit(r, "complete")  # PLANTED\n',
            ),
        ),
    ),
    Mutant(
        "commit-not-retried",
        "replies: a finished reply's commit is not retried through a Postgres outage "
        "(the reply is lost with commit_failed)",
        (
            (
                "chatd/engine/reply_run.py",
                "                    self.commit_retries += 1\n                    await backoff.sleep()\n"
                "                    continue\n",
                "                    break  # PLANTED\n",
            ),
        ),
    ),
    Mutant(
        "watch-inverted",
        "access: subscriptions allowed by the token's grants are re-checked, those "
        "allowed by a membership are not (a revoked member keeps reading)",
        (
            (
                "chatd/engine/ops.py",
                '    if "r" not in identity.grants.rights(conv):\n        s.services.access.watch(',
                '    if "r" in identity.grants.rights(conv):  # PLANTED\n'
                "        s.services.access.watch(",
            ),
        ),
    ),
    Mutant(
        "history-unchecked",
        "sessions: a history page is read without checking the read right",
        (
            (
                "chatd/engine/ops.py",
                "    assert s.identity is not None\n    await s.services.access.require(s.identity, "
                'conv, "r", req.ref)\n    async with s.services.history_slots:\n',
                "    assert s.identity is not None  # PLANTED\n"
                "    async with s.services.history_slots:\n",
            ),
        ),
    ),
    Mutant(
        "commit-unfenced",
        "replies: a reply's final commit does not name the process it was registered "
        "under, so an owner declared dead meanwhile still stores it",
        (
            (
                "chatd/engine/reply_run.py",
                "                        msg, finished=[r.id], owner=r.owner\n",
                "                        msg, finished=[r.id], owner=None  # PLANTED\n",
            ),
        ),
    ),
    Mutant(
        "revoke-keeps-feed",
        "sessions: a revoked subscription is ended for the client, but the session "
        "stays joined to the conversation's feed (its events keep coming)",
        (
            (
                "chatd/engine/session.py",
                "        self._counters.revoked_subscriptions += 1\n        self.leave(conv)\n",
                "        self._counters.revoked_subscriptions += 1\n"
                "        self.subscriptions.discard(conv)  # PLANTED\n",
            ),
        ),
    ),
]


def _copy_project(dest: Path) -> None:
    for name in ("chatd", "tests", "fuzz", "sim"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "conftest.py"):
        shutil.copy(ROOT / name, dest / name)


def run_mutant(m: Mutant, budget: int) -> bool:
    """True if the simulator caught the mutant within ``budget`` interleavings."""
    with tempfile.TemporaryDirectory(prefix=f"chatd-sim-mutant-{m.name}-") as tmp:
        dest = Path(tmp)
        _copy_project(dest)
        for file, old, new in m.patches:
            path = dest / file
            src = path.read_text()
            if src.count(old) != 1:
                raise SystemExit(f"mutant {m.name}: anchor not found once in {file}: {old!r}")
            path.write_text(src.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(dest)}
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                *("-m", "sim", "run", "--examples", str(budget), "--workers", str(WORKERS)),
            ],
            cwd=dest,
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    print(f"\n== {m.name}: {m.what}")
    found = re.search(r"VIOLATION at interleaving (\d+), ([\d.]+)s in", out)
    if proc.returncode == 0 or not found:
        print(f"   SURVIVED {budget} interleavings ({took:.0f}s)")
        if proc.returncode != 0:
            print("   (the run failed otherwise:)\n" + out[-2000:])
        return False
    print(
        f"   CAUGHT at interleaving {found.group(1)}, {found.group(2)}s in "
        f"({took:.0f}s with shrinking); shrunk to:"
    )
    print("   " + _falsifying(out))
    error = re.findall(r"(AssertionError: .*|TooSlowError.*)", out)
    if error:
        print(f"   violated: {error[-1][:240]}")
    return True


def _falsifying(out: str) -> str:
    # Hypothesis's report, perhaps inside an exception group's "  | " margin.
    found = re.search(r"(?:Falsifying example|Failing test case): one\((.*?)\n[ |]*\)", out, re.S)
    if not found:
        return "(not in the output)"
    return re.sub(r"\s*\n[ |]*", " ", found.group(1)).strip().rstrip(",")


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    if not chosen:
        print(f"unknown mutant; choose from: {', '.join(m.name for m in MUTANTS)}")
        return 2
    survivors = [m.name for m in chosen if not run_mutant(m, BUDGET)]
    print(f"\n{len(chosen) - len(survivors)}/{len(chosen)} planted bugs caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
