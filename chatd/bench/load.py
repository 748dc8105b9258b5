"""``chatd bench load``: realistic conversations bulk-loaded with COPY.

Users have a few conversations, each with a few sessions, each with a
long-tailed (Pareto) number of events; events are user/assistant/system
messages in a weighted mix with log-uniform text lengths, read from a TOML
file (``--mix``; the default is ``chatd/bench/mix.toml``). Rows go straight
into ``messages`` and ``conversations`` with COPY, exactly as chatd would have
written them (gapless seqs per conversation, heads set), so chatd serves them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import random
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatd.bench.common import machine
from chatd.config import Config

DEFAULT_MIX = Path(__file__).with_name("mix.toml")
_CHUNK = 50_000


def parse_size(text: str) -> int:
    """``100k`` / ``1M`` / ``10M`` / ``2500`` -> an event count."""
    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 100k, 1M)") from None


def add_parser(sub: Any) -> None:
    s = sub.add_parser("load", help="bulk-load realistic conversations with COPY; rate and sizes")
    s.add_argument(
        "--events",
        type=parse_size,
        default=parse_size("100k"),
        help="events to load (100k, 1M, 10M)",
    )
    s.add_argument("--mix", type=Path, default=DEFAULT_MIX, help="event mix (TOML)")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


@dataclass(frozen=True)
class Mix:
    roles: tuple[str, ...]
    weights: tuple[float, ...]
    chars: dict[str, tuple[int, int]]
    convs_per_user: float
    sessions_per_conv: float
    pareto_alpha: float
    events_scale: float
    max_events_per_session: int

    @classmethod
    def load(cls, path: Path) -> Mix:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"cannot read mix file {path}: {exc}") from None
        try:
            mix = data["mix"]
            shape = data["shape"]
            roles = tuple(mix)
            chars = {r: tuple(data["chars"][r]) for r in roles}
            return cls(
                roles,
                tuple(float(mix[r]) for r in roles),
                chars,  # type: ignore[arg-type]
                float(shape["convs_per_user"]),
                float(shape["sessions_per_conv"]),
                float(shape["pareto_alpha"]),
                float(shape["events_scale"]),
                int(shape["max_events_per_session"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"mix file {path}: missing or bad key {exc}") from None


class Generator:
    """Deterministic for a seed; generates whole conversations."""

    def __init__(self, mix: Mix, seed: int, prefix: str) -> None:
        self.mix = mix
        self.rng = random.Random(seed)
        self.prefix = prefix
        self.users = 0
        # One big random text; bodies are slices of it (generating text per row is slow).
        letters = "abcdefghijklmnopqrstuvwxyz     é"
        self.text = "".join(self.rng.choice(letters) for _ in range(1 << 16))
        self.start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def _geometric(self, mean: float) -> int:
        # 1 + geometric with the given mean.
        p = 1.0 / mean
        return 1 + int(math.log(1 - self.rng.random()) / math.log(1 - p)) if p < 1 else 1

    def _body(self, role: str) -> str:
        lo, hi = self.mix.chars[role]
        n = int(math.exp(self.rng.uniform(math.log(lo), math.log(hi))))
        off = self.rng.randrange(0, len(self.text) - n)
        return self.text[off : off + n]

    def user(self) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """One user's conversations: [(conv id, message rows)]."""
        m, rng = self.mix, self.rng
        u = self.users
        self.users += 1
        out = []
        for k in range(self._geometric(m.convs_per_user)):
            conv = f"{self.prefix}u{u}c{k}"
            rows: list[tuple[Any, ...]] = []
            t = self.start + dt.timedelta(seconds=rng.uniform(0, 300 * 86400))
            for _ in range(self._geometric(m.sessions_per_conv)):
                n = min(
                    m.max_events_per_session,
                    max(1, int(rng.paretovariate(m.pareto_alpha) * m.events_scale)),
                )
                for _ in range(n):
                    role = rng.choices(m.roles, m.weights)[0]
                    seq = len(rows) + 1
                    user = f"user{u}" if role == "user" else role
                    rows.append((conv, seq, f"e{seq}", user, role, "complete", self._body(role), t))
                    t += dt.timedelta(seconds=rng.uniform(2, 90))
                t += dt.timedelta(hours=rng.uniform(1, 240))
            out.append((conv, rows))
        return out


_MSG_COLUMNS = ["conv_id", "seq", "client_id", "user_id", "role", "status", "body", "created_at"]


async def load_events(
    dsn: str, gen: Generator, target: int, convs: list[tuple[str, int]]
) -> dict[str, Any]:
    """COPY conversations until ``target`` more events are in; appends (conv, head) to ``convs``."""
    import asyncpg

    con = await asyncpg.connect(dsn)
    try:
        loaded = 0
        t0 = time.monotonic()
        while loaded < target:
            msg_rows: list[tuple[Any, ...]] = []
            conv_rows: list[tuple[Any, ...]] = []
            while len(msg_rows) < _CHUNK and loaded + len(msg_rows) < target:
                for conv, rows in gen.user():
                    msg_rows.extend(rows)
                    conv_rows.append((conv, len(rows), rows[0][7]))
                    convs.append((conv, len(rows)))
            async with con.transaction():
                await con.copy_records_to_table(
                    "conversations", records=conv_rows, columns=["id", "head", "created_at"]
                )
                await con.copy_records_to_table("messages", records=msg_rows, columns=_MSG_COLUMNS)
            loaded += len(msg_rows)
        elapsed = time.monotonic() - t0
        await con.execute("ANALYZE conversations; ANALYZE messages")
        sizes = await table_sizes(con)
        return {"loaded": loaded, "seconds": elapsed, "events_per_s": loaded / elapsed, **sizes}
    finally:
        await con.close()


async def table_sizes(con: Any) -> dict[str, Any]:
    row = await con.fetchrow(
        "SELECT (SELECT count(*) FROM messages) AS events, "
        "(SELECT count(*) FROM conversations) AS conversations, "
        "pg_relation_size('messages') AS messages_heap, "
        "pg_indexes_size('messages') AS messages_indexes, "
        "pg_total_relation_size('messages') AS messages_total, "
        "pg_total_relation_size('conversations') AS conversations_total"
    )
    return dict(row)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


async def _migrate(config: Config) -> None:
    import asyncpg

    from chatd.adapters import schema

    pool = await asyncpg.create_pool(config.postgres.dsn, min_size=1, max_size=2)
    try:
        await schema.apply(pool)
    finally:
        await pool.close()


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    asyncio.run(_migrate(config))
    gen = Generator(Mix.load(args.mix), args.seed, f"b{time.time_ns() % 10**8:x}-")
    convs: list[tuple[str, int]] = []
    print(f"loading {args.events} events with COPY...", flush=True)
    r = asyncio.run(load_events(config.postgres.dsn, gen, args.events, convs))
    results.update(r)
    heads = sorted(h for _, h in convs)
    print()
    print(f"{'events loaded':<28}{r['loaded']:>14,}")
    print(f"{'conversations':<28}{len(convs):>14,}")
    print(
        f"{'events/conv p50 / p99 / max':<28}{heads[len(heads) // 2]:>6} /{heads[int(len(heads) * 0.99)]:>5} /{heads[-1]:>5}"
    )
    print(f"{'load rate':<28}{r['events_per_s']:>12,.0f}/s  ({r['seconds']:.1f} s)")
    print(f"{'messages heap':<28}{fmt_bytes(r['messages_heap']):>14}")
    print(f"{'messages indexes':<28}{fmt_bytes(r['messages_indexes']):>14}")
    print(f"{'messages total':<28}{fmt_bytes(r['messages_total']):>14}")
    print(f"{'table now holds':<28}{r['events']:>14,} events")
    return results
