"""The mutation check: plant known bugs in a copy of chatd and expect the fuzzer to catch each.

    .venv/bin/python -m fuzz.mutations            # every planted fault
    .venv/bin/python -m fuzz.mutations dedup      # one of them

For each mutant: copy the project to a temp dir, apply the patch, run the
``mutation`` fuzz profile there (seeded, generated interleavings only: the
pinned @examples are skipped, so the fuzzer must find the bug itself), and
require a failure; print the minimal interleaving Hypothesis shrank it to. Exits 1 if
any mutant survives.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    #: (file, anchor that must occur exactly once, its replacement)
    patches: tuple[tuple[str, str, str], ...]


MUTANTS = [
    Mutant(
        "publish-aborts-commit",
        "a failed token publish aborts the reply: it is never committed",
        (
            (
                "chatd/engine/lane.py",
                "                    self.failures += 1\n",
                "                    self.failures += 1\n"
                "                    for r in batch:  # PLANTED\n"
                "                        r.truncated = None\n"
                "                        if r.scope is not None:\n"
                "                            r.scope.cancel()\n",
            ),
            (
                "chatd/engine/reply_run.py",
                "            error = await self._generate(r)\n",
                "            error = await self._generate(r)\n"
                "            if r.truncated is None:  # PLANTED\n"
                "                error = ModelError('token publish failed')\n",
            ),
        ),
    ),
    Mutant(
        "dedup",
        "live events are delivered without dedupe against the snapshot/cursor (overlaps repeat)",
        (
            (
                "chatd/engine/feed.py",
                "        behind = [s for s in self.subs.values() if s.last < ev.seq]\n",
                "        behind = list(self.subs.values())  # PLANTED\n",
            ),
            (
                "chatd/engine/feed.py",
                "                if seq == sub.last + 1:\n",
                "                if seq > 0:  # PLANTED\n",
            ),
        ),
    ),
    Mutant(
        "ack-before-commit",
        "a send whose commit failed is acknowledged anyway",
        (
            (
                "chatd/engine/committer.py",
                "            for p in batch:\n                _answer(p, err)\n            return\n",
                "            for p in batch:  # PLANTED\n"
                "                _answer(p, Committed(p.msg.conv, p.msg.client_id, 0, False, {}))\n"
                "            return\n",
            ),
        ),
    ),
    Mutant(
        "leases-never-expire",
        "a process's lease never lapses: a dead owner's replies are never taken over",
        (
            (
                "chatd/adapters/postgres_replies.py",
                "WHERE lease_until < now() AND NOT dead RETURNING id",
                "WHERE lease_until < now() - interval '1 day' AND NOT dead RETURNING id",
            ),
        ),
    ),
]


def _copy_project(dest: Path) -> None:
    for name in ("chatd", "tests", "fuzz"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "conftest.py"):
        shutil.copy(ROOT / name, dest / name)


def run_mutant(m: Mutant) -> bool:
    """True if the fuzzer caught the mutant."""
    with tempfile.TemporaryDirectory(prefix=f"chatd-mutant-{m.name}-") as tmp:
        dest = Path(tmp)
        _copy_project(dest)
        for file, old, new in m.patches:
            path = dest / file
            src = path.read_text()
            if src.count(old) != 1:
                raise SystemExit(f"mutant {m.name}: anchor not found once in {file}: {old!r}")
            path.write_text(src.replace(old, new))
        _drop_examples(dest / "fuzz" / "test_interleavings.py")
        env = {**os.environ, "PYTHONPATH": str(dest)}
        check = subprocess.run(
            [sys.executable, "-c", "import chatd; print(chatd.__file__)"],
            cwd=dest,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert check.stdout.strip().startswith(str(dest)), "the mutant copy must be imported"
        t0 = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "fuzz/test_interleavings.py",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                "-m",
                "not slow",
                "--hypothesis-profile=ci",
            ],
            cwd=dest,
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - t0
    caught = proc.returncode != 0
    print(f"\n== {m.name}: {m.what}")
    if not caught:
        print(f"   SURVIVED: the fuzzer passed ({took:.0f}s)")
        return False
    out = proc.stdout
    log = Path(tempfile.gettempdir()) / f"chatd-mutant-{m.name}.log"
    log.write_text(out + proc.stderr)
    print(f"   CAUGHT in {took:.0f}s; the interleaving Hypothesis reported:")
    print("   " + _program(out))
    error = re.findall(r"(AssertionError: .*|TooSlowError.*)", out)
    if error:
        print(f"   violated: {error[0][:240]}")
    print(f"   (pytest's output: {log})")
    return True


def _drop_examples(path: Path) -> None:
    """Remove the pinned @example decorators: the fuzzer must find each bug by itself."""
    src = path.read_text()
    out, i = [], 0
    while (j := src.find("@example(", i)) >= 0:
        out.append(src[i:j])
        depth, k = 0, j + len("@example")
        while True:
            depth += {"(": 1, ")": -1}.get(src[k], 0)
            k += 1
            if depth == 0:
                break
        i = k + 1  # and the newline
    out.append(src[i:])
    path.write_text("".join(out))


def _program(out: str) -> str:
    """The ``program=[...]`` argument of the falsifying example, on one line."""
    # After Hypothesis's report, not in the test's source shown by the traceback.
    marks = [out.find(m) for m in ("Falsifying example", "Failing test case")]
    after = min((m for m in marks if m >= 0), default=-1)
    start = out.find("program=[", after) if after >= 0 else -1
    if start < 0:
        return "(not found in pytest's output)"
    depth, i = 0, start + len("program=")
    while i < len(out):
        depth += {"[": 1, "]": -1}.get(out[i], 0)
        i += 1
        if depth == 0:
            break
    return re.sub(r"\s*\|?\s*\n\s*\|?\s*", " ", out[start:i])


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    if not chosen:
        print(f"unknown mutant; choose from: {', '.join(m.name for m in MUTANTS)}")
        return 2
    survivors = [m.name for m in chosen if not run_mutant(m)]
    print(f"\n{len(chosen) - len(survivors)}/{len(chosen)} planted faults caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
