"""``chatd serve`` as an operator runs it: a child process, found by the line it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio


async def start_chatd(
    nursery: trio.Nursery, tmp_path, postgres, redis_server, toml: str
) -> tuple[trio.Process, str]:
    """Start ``chatd serve`` on the suite's servers with the config ``toml`` (in ``nursery``)."""
    conf = tmp_path / "chatd.toml"
    conf.write_text(toml)
    env = {
        **os.environ,
        "CHATD_POSTGRES_DSN": postgres.dsn,
        "CHATD_REDIS_URL": redis_server.url,
    }
    return await run_chatd(nursery, conf, env)


async def run_chatd(
    nursery: trio.Nursery, conf: Path, env: dict[str, str], *, stderr: bool = False
) -> tuple[trio.Process, str]:
    """Start ``chatd --config conf serve``; its process and the URL from the line it
    prints once it serves. ``stderr``: capture it (``proc.stderr``)."""
    proc: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [sys.executable, "-m", "chatd.cli", "--config", str(conf), "serve"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if stderr else None,
            env=env,
            check=False,
        )
    )
    line = b""
    with trio.fail_after(90):
        while b"\n" not in line:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                err = await proc.stderr.receive_some(65536) if stderr else b"(see stderr)"
                raise AssertionError(f"chatd exited: {err.decode(errors='replace')}")
            line += chunk
    return proc, line.decode().split("serving on ", 1)[1].split()[0]
