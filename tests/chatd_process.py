"""``chatd serve`` as an operator runs it: a child process on the suite's servers."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import trio


async def start_chatd(
    nursery: trio.Nursery, tmp_path, postgres, redis_server, toml: str
) -> tuple[trio.Process, str]:
    """Start ``chatd serve`` with the config ``toml`` (in ``nursery``); its process
    and the URL from the line it prints once it serves."""
    conf = tmp_path / "chatd.toml"
    conf.write_text(toml)
    env = {
        **os.environ,
        "CHATD_POSTGRES_DSN": postgres.dsn,
        "CHATD_REDIS_URL": redis_server.url,
    }
    proc: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [sys.executable, "-m", "chatd.cli", "--config", str(conf), "serve"],
            stdout=subprocess.PIPE,
            env=env,
            check=False,
        )
    )
    line = b""
    with trio.fail_after(60):
        while b"\n" not in line:
            line += await proc.stdout.receive_some(4096)
    return proc, line.decode().split("serving on ", 1)[1].split()[0]
