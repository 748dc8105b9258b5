"""``chatd serve`` with ``[server].workers`` > 1: one port, N chatd processes.

One chatd process runs on one core (one Trio thread). To use the cores of a
VM, the supervisor (this module, in the ``chatd serve`` process) opens the
listening socket once and starts N workers, each a ``chatd serve`` of its own
that inherits the socket (the pre-fork model of gunicorn and uvicorn's
``--workers``): the kernel hands each new connection to whichever worker
accepts first, so a busy worker takes fewer. The workers share Postgres and
Redis like any chatd processes (leases, takeover and the relay already
assume several), and the supervisor runs no engine of its own.

* A worker that exits without being asked is restarted (with a backoff
  that grows while it keeps dying, so a crash loop does not spin).
* SIGTERM or SIGINT: every worker gets SIGTERM and drains as a single
  chatd would (sends answered, replies ended, clients closed with 1001)
  within ``[server].shutdown_grace``; whatever is still running a second
  later is killed. A second signal kills them at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

import trio

from chatd.backoff import Backoff
from chatd.config import Config
from chatd.embedded import EmbeddedServices
from chatd.embedded.supervisor import EmbeddedWatch

log = logging.getLogger("chatd.workers")

#: The environment variable naming the inherited listening socket's fd.
LISTEN_FD = "CHATD_LISTEN_FD"
#: A worker that ran this long before dying resets the restart backoff.
_STABLE = 10.0


def open_listen_socket(host: str, port: int) -> socket.socket:
    """The one listening socket every worker accepts on (inheritable)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(socket.SOMAXCONN)
    sock.set_inheritable(True)
    return sock


def inherited_listener() -> trio.SocketListener | None:
    """In a worker: a Trio listener over the socket the supervisor opened."""
    fd = os.environ.get(LISTEN_FD)
    if not fd:
        return None
    sock = socket.socket(fileno=int(fd))
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


@dataclass
class _Worker:
    index: int
    proc: trio.Process | None = None
    started_at: float = 0.0
    restarts: int = 0


class _Supervisor:
    def __init__(self, config: Config, config_path: str | None, sock: socket.socket) -> None:
        self.cfg = config.server
        self.sock = sock
        self.env = {
            **os.environ,
            LISTEN_FD: str(sock.fileno()),
            # The servers the supervisor resolved (embedded ones included).
            "CHATD_POSTGRES_DSN": config.postgres.dsn,
            "CHATD_REDIS_URL": config.redis.url,
        }
        self.cmd = [sys.executable, "-m", "chatd.cli"]
        if config_path:
            self.cmd += ["--config", config_path]
        self.cmd += ["serve", "--worker"]
        self.workers = [_Worker(i) for i in range(self.cfg.workers)]
        self.stopping = False

    async def keep_running(
        self, w: _Worker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run worker ``w``, and again whenever it dies unasked; started once it serves."""
        backoff = Backoff(0.5, 10.0)
        while True:
            w.started_at = trio.current_time()
            # A session of its own: a terminal's Ctrl-C reaches the supervisor
            # only, which drains the workers once (not twice, which stops now).
            w.proc = await trio.lowlevel.open_process(
                self.cmd,
                env=self.env | {"CHATD_WORKER": str(w.index)},
                pass_fds=(self.sock.fileno(),),
                stdout=subprocess.PIPE,
                start_new_session=True,
            )
            await self._serving(w.proc)
            if w.restarts == 0:
                task_status.started()
            code = await w.proc.wait()
            if self.stopping:
                return
            ran = trio.current_time() - w.started_at
            if ran > _STABLE:
                backoff.reset()
            w.restarts += 1
            delay = backoff.next()
            log.warning(
                "worker %d exited with %s after %.1fs; restarting in %.1fs (restart %d)",
                w.index,
                code,
                ran,
                delay,
                w.restarts,
            )
            await trio.sleep(delay)
            if self.stopping:
                return

    @staticmethod
    async def _serving(proc: trio.Process) -> None:
        """Until the worker prints its serving line (or exits: it is restarted)."""
        assert proc.stdout is not None
        line = b""
        with trio.move_on_after(60):
            while b"\n" not in line:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    return
                line += chunk

    def signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signum)

    async def kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        late = [w.index for w in self.workers if w.proc is not None and w.proc.returncode is None]
        if late:
            log.warning("workers %s did not stop within the shutdown deadline: killed", late)
            self.signal_all(signal.SIGKILL)

    async def until_all_exit(self, scope: trio.CancelScope) -> None:
        for w in self.workers:
            if w.proc is not None:
                await w.proc.wait()
        scope.cancel()


async def supervise(
    config: Config, *, config_path: str | None, embedded: EmbeddedServices | None = None
) -> None:
    """Run ``[server].workers`` chatd processes on one port until a signal.

    ``embedded``: the servers this process started, restarted here if they die."""
    cfg = config.server
    sock = open_listen_socket(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    scheme = "wss" if cfg.tls_cert else "ws"
    sup = _Supervisor(config, config_path, sock)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                if embedded is not None:
                    await nursery.start(EmbeddedWatch(embedded).run)
                try:
                    with trio.fail_after(90):
                        for w in sup.workers:
                            await nursery.start(sup.keep_running, w)
                finally:
                    if not all(w.proc for w in sup.workers):
                        sup.signal_all(signal.SIGKILL)
                url = f"{scheme}://{host}:{port}/"
                print(f"chatd serving on {url} ({cfg.workers} workers)", flush=True)
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not sup.stopping:
                        sup.stopping = True
                        log.info("received %s: draining %d worker(s)", name, cfg.workers)
                        sup.signal_all(signal.SIGTERM)
                        nursery.start_soon(sup.kill_after, cfg.shutdown_grace + 1.0)
                        nursery.start_soon(sup.until_all_exit, nursery.cancel_scope)
                    else:
                        log.warning("received %s again: killing the workers", name)
                        sup.signal_all(signal.SIGKILL)
    finally:
        sup.signal_all(signal.SIGKILL)  # only those still running: none on the orderly path
        sock.close()
