"""An embedded Redis with no persistence (it holds no truth), run as a child process."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from chatd.embedded.processes import _wait, cmdline, die_with_parent, free_port, stop_leftover
from chatd.errors import ServiceStartError

log = logging.getLogger("chatd.embedded")

_REDIS_INSTALL_HINT = (
    "install the Redis server (Debian/Ubuntu: apt-get install redis-server) "
    "or set [embedded].redis_server, or configure [redis].url to use an existing server"
)


def find_redis_server(configured: str = "") -> Path:
    """The redis-server binary; raises with an install hint."""
    candidates = (
        [configured]
        if configured
        else [
            shutil.which("redis-server") or "",
            "/usr/bin/redis-server",
            "/usr/local/bin/redis-server",
        ]
    )
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    raise ServiceStartError(
        f"redis-server not found ({configured or 'PATH, /usr/bin, /usr/local/bin'}): {_REDIS_INSTALL_HINT}"
    )


class RedisServer:
    """A Redis with no persistence (it holds no truth) run as a child process."""

    def __init__(self, data_dir: Path, *, binary: Path, start_timeout: float = 10.0) -> None:
        self.data_dir = data_dir.resolve() / "redis"
        self.binary = binary
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._password = secrets.token_urlsafe(24)

    @property
    def url(self) -> str:
        return f"redis://:{quote(self._password, safe='')}@127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        """Start (fresh and empty every time); ``port`` reuses a previous port."""
        self.spawn(port)
        self.wait_ready()

    def spawn(self, port: int | None = None) -> None:
        """Start the process (quick); :meth:`wait_ready` waits until it answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        self.port = port or free_port()
        conf = self.data_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(
                f'port {self.port}\nbind 127.0.0.1\nsave ""\nappendonly no\n'
                f"dir {self.data_dir}\nlogfile {self.data_dir / 'redis.log'}\n"
                f"requirepass {self._password}\ndaemonize no\npidfile {self._pidfile}\n"
            )
        self.proc = subprocess.Popen(
            [str(self.binary), str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            # Nothing to save: it dies with chatd.
            preexec_fn=die_with_parent(signal.SIGKILL),
        )

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while not self._ping():
            if self.proc.poll() is not None:
                raise ServiceStartError(
                    f"redis-server exited at start (code {self.proc.returncode}); see {self.data_dir / 'redis.log'}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise ServiceStartError(f"redis-server did not answer within {self.start_timeout}s")
            time.sleep(0.02)

    @property
    def _pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    def _stop_leftover(self) -> None:
        """Stop a Redis a previous chatd left running from this directory (it was killed)."""
        try:
            pid = int(self._pidfile.read_text())
        except (OSError, ValueError):
            return
        command = cmdline(pid)
        if command and "redis" in command[0] and pid != (self.proc.pid if self.proc else None):
            stop_leftover(pid, signal.SIGKILL, 5.0)
            log.warning(
                "stopped the Redis (pid %d) a previous chatd left running from %s",
                pid,
                self.data_dir,
            )
        self._pidfile.unlink(missing_ok=True)

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(f"AUTH {self._password}\r\nPING\r\n".encode())
                data = b""
                while data.count(b"\r\n") < 2:
                    chunk = s.recv(256)
                    if not chunk:
                        return False
                    data += chunk
                return b"+PONG" in data
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.resume()
        self.proc.terminate()
        _wait(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: Redis and everything in it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
