"""``chatd bench``: throughput and latency with printed tables.

Every run measures the raw limits (plain asyncio asyncpg and redis, no chatd)
against the same PostgreSQL and Redis, then chatd itself as a separate
``chatd serve`` process driven over WebSocket, and reports chatd's ratio.
The machines are shared and noisy: compare ratios, not absolute numbers.
Each subcommand is a module here with ``add_parser(sub)`` and ``run(config, args, tmp)``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

from chatd.bench import (
    abuse,
    auth,
    bridge,
    durable,
    idle,
    load,
    reads,
    reconnect,
    sends,
    storm,
    stream,
    survive,
)
from chatd.config import Config

_BENCHES = {
    "abuse": abuse,
    "auth": auth,
    "bridge": bridge,
    "durable": durable,
    "idle": idle,
    "load": load,
    "reads": reads,
    "reconnect": reconnect,
    "sends": sends,
    "storm": storm,
    "stream": stream,
    "survive": survive,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="which", required=True)
    for module in _BENCHES.values():
        module.add_parser(sub)


def main(config: Config, args: argparse.Namespace) -> int:
    """Start what the benchmark needs (embedded servers unless DSNs are configured) and run it."""
    from chatd.embedded import EmbeddedServices

    with tempfile.TemporaryDirectory(prefix="chatd-bench-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)
        cfg = replace(config, embedded=replace(config.embedded, data_dir=str(tmp / "data")))
        with EmbeddedServices(cfg) as resolved:
            results = _BENCHES[args.which].run(resolved, args, tmp)
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0
