"""The fuzzer's second chatd: a real ``chatd serve`` process that steps kill and pause.

The chatd under test (``serve()`` in the test's own process) shares Postgres
and Redis with this peer. Replies generated on the peer are watched from the
in-process chatd, so killing (SIGKILL) or pausing (SIGSTOP, then SIGCONT)
the peer tests what the surviving process does with them: takeover past the
lease, fencing when a paused owner wakes. A killed peer is restarted, as a
supervisor would; clients retry on it with the same message id.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from chatd.ports import ConnectionGone
from tests.client import Client

#: What the peer's clients may run into while it is killed or paused.
GONE = (ConnectionClosed, ConnectionGone, HandshakeError, OSError, trio.TooSlowError)


def peer_toml(lease: float, takeover: float) -> str:
    """The peer's config: it checkpoints its replies (the chatd under test does
    not), so every takeover mixes the two modes."""
    return (
        '[server]\nport = 0\nhello_timeout = 5.0\n[log]\nlevel = "info"\n'
        "[postgres]\ncommand_timeout = 3.0\n"
        "[redis]\ncommand_timeout = 1.0\nconnect_timeout = 1.0\n"
        f"[streams]\nlease = {lease}\ntakeover_interval = {takeover}\ncommit_timeout = 15.0\n"
        'persistence = "checkpoint"\ncheckpoint_interval_ms = 100\n'
        "[model]\nfake_tokens = 20\nfake_token_rate = 100.0\n"
        "[relay]\npoll_interval = 0.3\n[retry]\nbackoff_max = 0.3\n"
        '[auth]\nanonymous_operators = ["ops"]\n'
        "[limits]\nsend_rate = 0\nread_rate = 0\nframe_rate = 0\n"
        "replies_per_connection = 1000\nreplies_per_user = 1000\n"
    )


class Peer:
    """A ``chatd serve`` child process, started on first use and after each kill."""

    def __init__(self, nursery: trio.Nursery, conf: Path, pg_dsn: str, redis_url: str) -> None:
        self._nursery = nursery
        self._conf = conf
        self._env = {**os.environ, "CHATD_POSTGRES_DSN": pg_dsn, "CHATD_REDIS_URL": redis_url}
        #: The peers' logs (all generations), kept for a failing program's report.
        self.log_path = conf.with_name("peer.log")
        self._log = self.log_path.open("ab")
        self._proc: trio.Process | None = None
        self._up = trio.Event()
        self._starting = False
        self._paused = 0
        self.url = ""
        self.kills = 0
        self.pauses = 0
        #: trio time the last kill or pause of the peer ended (0: none yet).
        self.last_fault_end = 0.0

    @property
    def started(self) -> bool:
        return self._proc is not None or self._starting

    async def url_when_up(self) -> str:
        """The serving peer's URL, starting it if it never ran."""
        if not self.started:
            self._starting = True
            self._nursery.start_soon(self._start)
        with trio.fail_after(60):
            await self._up.wait()
        return self.url

    async def _start(self) -> None:
        cmd = [sys.executable, "-m", "chatd.cli", "--config", str(self._conf), "serve"]
        proc = await self._nursery.start(
            partial(
                trio.run_process,
                cmd,
                stdout=subprocess.PIPE,
                stderr=self._log,
                env=self._env,
                check=False,
            )
        )
        line = b""
        with trio.fail_after(60):
            while b"\n" not in line:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the peer chatd exited before serving")
                line += chunk
        self._proc = proc
        self.url = line.decode().split("serving on ", 1)[1].split()[0]
        self._starting = False
        self._up.set()

    async def kill(self) -> None:
        """SIGKILL the peer, then start a new one (not waiting for it)."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        self._up = trio.Event()
        # Marked starting before the wait below: a request retrying meanwhile
        # must wait for the new peer, not start a second one of its own (its
        # replies would run on a process the harness no longer asks about).
        self._starting = True
        proc.kill()
        await proc.wait()
        self.kills += 1
        self.last_fault_end = trio.current_time()
        self._nursery.start_soon(self._start)

    async def pause(self, seconds: float) -> None:
        """SIGSTOP the peer for ``seconds``, then SIGCONT (run in the background)."""
        proc = self._proc
        if proc is None:
            return
        self.pauses += 1
        self._paused += 1
        try:
            proc.send_signal(signal.SIGSTOP)
            await trio.sleep(seconds)
        finally:
            self._paused -= 1
            if proc.returncode is None and self._paused == 0:
                proc.send_signal(signal.SIGCONT)
            self.last_fault_end = trio.current_time()

    async def settled(self) -> None:
        """Until no pause is in progress and a serving peer is up (if it ever ran)."""
        with trio.fail_after(60):
            while self._paused:
                await trio.sleep(0.05)
            if self.started:
                await self._up.wait()

    async def client(self, user: str) -> Client:
        url = await self.url_when_up()
        client = await Client.open(self._nursery, url)
        await client.hello(user)
        return client

    async def active_replies(self) -> int:
        """Replies the serving peer is generating or committing (0 if it never ran)."""
        if not self.started:
            return 0
        answer = await self.request({"op": "status"}, "status", user="ops")
        return int(answer["streams_active"])

    async def request(
        self, frame: dict[str, Any], reply: str, user: str = "peer-sender"
    ) -> dict[str, Any]:
        """Send ``frame`` on a new connection to the peer, retrying (same frame) until
        answered: across kills (a new peer) and pauses."""
        with trio.fail_after(90):
            while True:
                client = None
                try:
                    client = await self.client(user)
                    answer = await client.request(frame, reply, timeout=10)
                except GONE:
                    await trio.sleep(0.1)
                    continue
                finally:
                    if client is not None:
                        with trio.move_on_after(1):
                            await client.close()
                if answer.get("type") == "error" and answer.get("retryable"):
                    await trio.sleep(0.1)
                    continue
                return answer

    async def close(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
