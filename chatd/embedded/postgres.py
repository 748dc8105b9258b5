"""An embedded PostgreSQL cluster under a data directory, run as a child process.

PostgreSQL refuses to run as root: when chatd runs as root the cluster runs as
an unprivileged user (``[embedded].pg_user``, else ``postgres``, else ``nobody``).
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from chatd.embedded.processes import (
    _tail,
    _wait,
    children,
    cmdline,
    die_with_parent,
    free_port,
    stop_leftover,
)
from chatd.errors import ServiceStartError

log = logging.getLogger("chatd.embedded")

_PG_TOOLS = ("initdb", "postgres", "pg_isready")
_PG_INSTALL_HINT = (
    "install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql) "
    "or set [embedded].pg_bin_dir, or configure [postgres].dsn to use an existing server"
)


def find_pg_bin(configured: str = "") -> Path:
    """The directory holding initdb and postgres; raises with an install hint."""
    candidates: list[Path] = []
    if configured:
        candidates.append(Path(configured))
    else:
        found = shutil.which("initdb")
        if found:
            candidates.append(Path(found).resolve().parent)
        debian = sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        )
        candidates.extend(Path(p) for p in reversed(debian))
        candidates.extend(Path(p) for p in ("/usr/local/pgsql/bin", "/usr/pgsql/bin"))
    for c in candidates:
        if all((c / tool).is_file() for tool in _PG_TOOLS):
            return c
    where = configured or "PATH and /usr/lib/postgresql/*/bin"
    raise ServiceStartError(
        f"PostgreSQL server binaries ({', '.join(_PG_TOOLS)}) not found in {where}: {_PG_INSTALL_HINT}"
    )


def _pg_run_user(configured: str) -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in [configured] if configured else ["postgres", "nobody"]:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServiceStartError(
        f"running as root, PostgreSQL needs an unprivileged user; user {configured!r} does not exist"
    )


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    for parent in [path, *path.parents]:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            continue
        if not st.st_mode & stat.S_IXOTH:
            raise ServiceStartError(
                f"PostgreSQL runs as user {user.pw_name!r} (it refuses root) and cannot reach {path}: "
                f"{parent} is not searchable by other users. Choose an [embedded].data_dir under a "
                f"world-searchable directory (e.g. /var/lib/chatd) or run 'chmod o+x {parent}'"
            )


class PostgresServer:
    """A PostgreSQL cluster in ``data_dir`` run as a child process."""

    def __init__(
        self,
        data_dir: Path,
        *,
        bin_dir: Path,
        run_as: pwd.struct_passwd | None,
        start_timeout: float = 30.0,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pg"
        self.bin_dir = bin_dir
        self.run_as = run_as
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._password_file = self.data_dir / "pg.password"

    @property
    def password(self) -> str:
        return self._password_file.read_text().strip()

    @property
    def dsn(self) -> str:
        return self.dsn_for("chatd")

    def dsn_for(self, database: str) -> str:
        return (
            f"postgresql://chatd:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{database}"
        )

    def _popen_kwargs(self) -> dict[str, object]:
        if self.run_as is None:
            return {}
        return {"user": self.run_as.pw_uid, "group": self.run_as.pw_gid, "extra_groups": []}

    def _chown(self, path: Path) -> None:
        if self.run_as is not None:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    def _initdb(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as is not None:
            _check_reachable(self.data_dir, self.run_as)
        if not self._password_file.exists():
            fd = os.open(self._password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24) + "\n")
        if (self.pgdata / "PG_VERSION").exists():
            return
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)  # a half-done initdb from an earlier crash
        self.pgdata.mkdir(mode=0o700)
        self._chown(self.pgdata)
        # initdb reads the password from a file the cluster user can read; removed at once.
        pwfile = self.data_dir / ".initdb-pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        try:
            result = subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "chatd",
                    "-A",
                    "scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                capture_output=True,
                timeout=120,
                **self._popen_kwargs(),  # type: ignore[arg-type]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            raise ServiceStartError(
                f"initdb failed: {result.stderr.decode(errors='replace').strip()}"
            )

    def start(self, port: int | None = None) -> None:
        """Initialise the cluster if needed, start it, create the ``chatd`` database.

        ``port``: listen there (a restart keeps its DSN); default a free port.
        """
        self.spawn(port)
        self.wait_ready()

    def spawn(self, port: int | None = None) -> None:
        """Start the postmaster (quick); :meth:`wait_ready` waits until it serves."""
        self._initdb()
        self._stop_leftover()
        self.port = port or free_port()
        log_path = self.data_dir / "postgres.log"
        logf = open(log_path, "ab")
        self._chown(log_path)
        args = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=128MB",
        ]
        try:
            self.proc = subprocess.Popen(
                args,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Immediate shutdown (the postmaster stops its backends) if chatd dies.
                preexec_fn=die_with_parent(signal.SIGQUIT),
                **self._popen_kwargs(),
            )  # type: ignore[arg-type]
        finally:
            logf.close()

    def wait_ready(self) -> None:
        assert self.proc is not None
        log_path = self.data_dir / "postgres.log"
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServiceStartError(
                    f"postgres exited at start (code {self.proc.returncode}); see {log_path}:\n{_tail(log_path)}"
                )
            ready = subprocess.run(
                [
                    str(self.bin_dir / "pg_isready"),
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "chatd",
                    "-d",
                    "postgres",
                ],
                capture_output=True,
                timeout=10,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop("immediate")
                raise ServiceStartError(
                    f"postgres did not become ready within {self.start_timeout}s; see {log_path}"
                )
            time.sleep(0.05)
        self.ensure_database("chatd")
        # Where a running chatd's embedded server is, for other chatd commands
        # (``chatd grant``) on the same data directory.
        port_file = self.data_dir / "pg.port"
        port_file.write_text(f"{self.port}\n")
        port_file.chmod(0o600)

    def _stop_leftover(self) -> None:
        """Stop a postmaster a previous chatd left running on this cluster (it was killed)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        command = cmdline(pid)
        if "-D" not in command or command[command.index("-D") + 1 :][:1] != [str(self.pgdata)]:
            return  # gone (PostgreSQL removes its stale pid file), or not this cluster's
        if pid == (self.proc.pid if self.proc else None):
            return
        if not stop_leftover(pid, signal.SIGINT, 15.0):
            raise ServiceStartError(
                f"a PostgreSQL (pid {pid}) still runs on {self.pgdata} and would not stop"
            )
        log.warning(
            "stopped the PostgreSQL (pid %d) a previous chatd left running on %s", pid, self.pgdata
        )

    def running_dsn(self) -> str | None:
        """The DSN of this data directory's server if a chatd started it and it still runs."""
        try:
            port = int((self.data_dir / "pg.port").read_text())
        except (OSError, ValueError):
            return None
        self.port = port
        ready = subprocess.run(
            [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
            capture_output=True,
            timeout=10,
        )
        return self.dsn if ready.returncode == 0 else None

    def ensure_database(self, name: str) -> None:
        """Create database ``name`` (a plain identifier) unless it exists."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain database name: {name!r}")
        env = {**os.environ, "PGPASSWORD": self.password}
        psql = self.bin_dir / "psql"
        if not psql.is_file():
            psql = Path(shutil.which("psql") or "psql")
        base = [
            str(psql),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "chatd",
            "-d",
            "postgres",
            "-tAc",
        ]
        exists = subprocess.run(
            [*base, f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            capture_output=True,
            env=env,
            timeout=30,
        )
        if exists.returncode != 0:
            raise ServiceStartError(
                f"cannot query embedded postgres: {exists.stderr.decode(errors='replace')}"
            )
        if exists.stdout.strip() != b"1":
            created = subprocess.run(
                [*base, f"CREATE DATABASE {name}"], capture_output=True, env=env, timeout=30
            )
            if created.returncode != 0:
                raise ServiceStartError(
                    f"cannot create database {name}: {created.stderr.decode(errors='replace')}"
                )

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop: ``smart``/``fast`` (clean) or ``immediate`` (crash-like, recovers on start)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        self.resume()
        self.proc.send_signal(sig)
        _wait(self.proc, timeout)
        self.proc = None
        (self.data_dir / "pg.port").unlink(missing_ok=True)

    def pause(self) -> None:
        """SIGSTOP the postmaster and every backend: a hang, not an error."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, sig: signal.Signals) -> None:
        # Backends call setsid(), so the postmaster's process group is not enough.
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, sig)  # first, so it forks nothing new meanwhile
        for pid in children(self.proc.pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
