"""Embedded PostgreSQL and Redis as child processes under a data directory.

``chatd serve`` with no DSNs uses these; the test suite uses them too, so it
owns real servers it can kill, pause and restart. Both listen on 127.0.0.1 on
a free port with a generated password kept in the data directory (mode 0600),
so other local users cannot read or write the conversations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType

from chatd.config import Config
from chatd.embedded.lock import DataDirLock
from chatd.embedded.postgres import PostgresServer, _pg_run_user, find_pg_bin
from chatd.embedded.processes import free_port
from chatd.embedded.redis import RedisServer, find_redis_server

log = logging.getLogger("chatd.embedded")

__all__ = [
    "EmbeddedServices",
    "PostgresServer",
    "RedisServer",
    "_pg_run_user",
    "find_pg_bin",
    "find_redis_server",
    "free_port",
]


class EmbeddedServices:
    """Context manager: start what the config lacks a DSN for; yields the completed config."""

    def __init__(self, config: Config, *, reuse_running: bool = False) -> None:
        self.config = config
        #: Use this data directory's Postgres if a running chatd started it (admin
        #: commands beside ``chatd serve``), rather than starting one.
        self.reuse_running = reuse_running
        self.postgres: PostgresServer | None = None
        self.redis: RedisServer | None = None
        self._lock: DataDirLock | None = None

    def __enter__(self) -> Config:
        cfg = self.config
        data_dir = Path(cfg.embedded.data_dir)
        try:
            if not self.reuse_running and (not cfg.postgres.dsn or not cfg.redis.url):
                self._lock = DataDirLock(data_dir.resolve())
                self._lock.acquire()
            if not cfg.postgres.dsn:
                pg = PostgresServer(
                    data_dir,
                    bin_dir=find_pg_bin(cfg.embedded.pg_bin_dir),
                    run_as=_pg_run_user(cfg.embedded.pg_user),
                    start_timeout=cfg.embedded.start_timeout,
                )
                running = pg.running_dsn() if self.reuse_running else None
                if running is not None:
                    cfg = cfg.with_dsns(postgres=running)
                else:
                    self.postgres = pg
                    pg.start()
                    log.info("embedded PostgreSQL on 127.0.0.1:%d (data in %s)", pg.port, pg.pgdata)
            if not cfg.redis.url:
                self.redis = RedisServer(
                    data_dir, binary=find_redis_server(cfg.embedded.redis_server)
                )
                self.redis.start()
                log.info("embedded Redis on 127.0.0.1:%d", self.redis.port)
        except BaseException:
            self._stop()
            raise
        return cfg.with_dsns(
            postgres=self.postgres.dsn if self.postgres else None,
            redis=self.redis.url if self.redis else None,
        )

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        try:
            if self.redis is not None:
                self.redis.stop()
            if self.postgres is not None:
                self.postgres.stop("fast")
        finally:
            if self._lock is not None:
                self._lock.release()
