"""``chatd bench auth``: what authentication and limits cost.

1. Handshakes per second (connect, hello, welcome, close), ``--clients``
   connecting at once, for anonymous hellos, HS256 tokens and ES256 tokens
   (a public key): a chatd process per mode, in the same run.
2. ``bench sends``' full-load phase twice: anonymous with no limits, then
   ``jwt`` mode (HS256, tokens with a prefix grant) with every per-connection
   limit on (set high enough not to refuse: their code runs on every frame).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import orjson

from chatd.bench.common import cpu_seconds, machine, pct, start_chatd
from chatd.config import Config

_SECRET = "b" * 64


def add_parser(sub: Any) -> None:
    s = sub.add_parser("auth", help="handshakes/s with token verification; sends with auth on/off")
    s.add_argument("--clients", type=int, default=32, help="clients connecting at once")
    s.add_argument("--seconds", type=float, default=5.0, help="duration of each phase")
    s.add_argument("--senders", type=int, default=16)
    s.add_argument("--convs", type=int, default=8)
    s.add_argument("--viewers", type=int, default=2)
    s.add_argument("--window", type=int, default=64)
    s.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _es256(tmp: Path) -> tuple[Any, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp / "bench-es256.pem"
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, str(path)


def _token(key: Any, alg: str, user: str) -> str:
    import jwt

    claims = {"sub": user, "exp": int(time.time()) + 3600, "chatd": {"convs": {"bench-*": "rw"}}}
    return jwt.encode(claims, key, algorithm=alg)


async def _handshakes(url: str, args: argparse.Namespace, hello: Any) -> dict[str, Any]:
    import trio

    from chatd.bench.wire import WireClient

    latencies: list[float] = []
    errors = 0
    stop = trio.current_time() + args.seconds

    async def worker(k: int) -> None:
        nonlocal errors
        n = 0
        while trio.current_time() < stop:
            t0 = time.monotonic()
            ws = await WireClient.connect(url)
            try:
                await ws.send([hello(f"hs{k}-{n}")])
                frames = await ws.receive()
                if not frames or orjson.loads(frames[0]).get("type") != "welcome":
                    errors += 1
                else:
                    latencies.append(time.monotonic() - t0)
            finally:
                with trio.move_on_after(2.0, shield=True):
                    await ws.aclose()
            n += 1

    t0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for k in range(args.clients):
            nursery.start_soon(worker, k)
    took = time.monotonic() - t0
    return {
        "handshakes": len(latencies),
        "per_s": len(latencies) / took,
        "p50_ms": pct(latencies, 0.5) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "errors": errors,
    }


async def _verify_cost(es_key: Any, es_pem: str, n: int = 2000) -> dict[str, float]:
    """CPU microseconds per token verified in this process (no network): the part
    of a handshake that authentication adds."""
    from chatd.adapters.keys import open_keys
    from chatd.config import AuthConfig
    from chatd.tokens import TokenVerifier

    out = {}
    for name, cfg, key, alg in (
        ("HS256", AuthConfig(mode="jwt", secret=_SECRET), _SECRET, "HS256"),
        (
            "ES256",
            AuthConfig(mode="jwt", algorithms=("ES256",), public_key_file=es_pem),
            es_key,
            "ES256",
        ),
    ):
        tokens = [_token(key, alg, f"v{i}") for i in range(n)]
        async with open_keys(cfg) as keys:
            verifier = TokenVerifier(cfg, keys, ("assistant",))
            t0 = time.process_time()
            for t in tokens:
                await verifier.verify(t)
            out[name] = 1e6 * (time.process_time() - t0) / n
    return out


def _serve(config: Config, tmp: Path, auth: dict[str, Any], limits: dict[str, Any]) -> Any:
    return start_chatd(config, tmp, {"auth": auth, "limits": limits}, env={})


def run(config: Config, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio

    from chatd.bench.sends import anonymous_hello, drive_sends

    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"func": None}}
    print(f"machine: {results['machine']}")
    es_key, es_pem = _es256(tmp)
    results["verify_us"] = trio.run(_verify_cost, es_key, es_pem)
    modes = {
        "anonymous": ({"mode": "anonymous"}, anonymous_hello),
        "jwt HS256": (
            {"mode": "jwt", "secret": _SECRET},
            lambda u: orjson.dumps({"op": "hello", "token": _token(_SECRET, "HS256", u)}),
        ),
        "jwt ES256": (
            {"mode": "jwt", "algorithms": ["ES256"], "public_key_file": es_pem},
            lambda u: orjson.dumps({"op": "hello", "token": _token(es_key, "ES256", u)}),
        ),
    }
    hs: dict[str, Any] = {}
    for name, (auth, hello) in modes.items():
        # Tokens are minted before the phase: the load generator's signing is not measured.
        frames = {
            f"hs{k}-{n}": hello(f"hs{k}-{n}") for k in range(args.clients) for n in range(400)
        }
        proc, url = _serve(config, tmp, auth, {"connections_per_address": 100000})
        try:
            print(f"handshakes, {name}: {args.clients} clients connecting at once...", flush=True)
            cpu0 = cpu_seconds(proc.pid)
            r = trio.run(_handshakes, url, args, lambda u, f=frames, h=hello: f.get(u) or h(u))
            r["server_cpu_ms_per_handshake"] = (
                1000 * (cpu_seconds(proc.pid) - cpu0) / max(1, r["handshakes"])
            )
            hs[name] = r
        finally:
            proc.terminate()
            proc.wait(15)
    results["handshakes"] = hs
    sends: dict[str, Any] = {}
    on = {"send_rate": 1e9, "send_burst": 1_000_000, "read_rate": 1e9, "read_burst": 1_000_000}
    on |= {"replies_per_connection": 1000, "replies_per_user": 1000}
    runs = {
        "auth off, limits off": ({"mode": "anonymous"}, {}, anonymous_hello),
        "jwt HS256, limits on": (
            {"mode": "jwt", "secret": _SECRET},
            on,
            lambda u: orjson.dumps({"op": "hello", "token": _token(_SECRET, "HS256", u)}),
        ),
    }
    for name, (auth, limits, hello) in runs.items():
        proc, url = _serve(config, tmp, auth, limits)
        try:
            print(f"sends, full load, {name}...", flush=True)
            cpu0 = cpu_seconds(proc.pid)
            r = trio.run(drive_sends, url, args, None, name.split(",")[0].replace(" ", ""), hello)
            r["server_cpu"] = (cpu_seconds(proc.pid) - cpu0) / args.seconds
            sends[name] = r
        finally:
            proc.terminate()
            proc.wait(15)
    results["sends"] = sends
    _print(results)
    return results


def _print(r: dict[str, Any]) -> None:
    print()
    verify = ", ".join(f"{alg} {us:.0f} us" for alg, us in r["verify_us"].items())
    print(f"token verification alone, CPU per token (in process): {verify}")
    print()
    print(f"{'handshakes':24} {'per s':>8} {'p50':>8} {'p99':>8} {'cpu/hs':>8} {'err':>4}")
    base = r["handshakes"]["anonymous"]["per_s"]
    for name, h in r["handshakes"].items():
        print(
            f"{name:24} {h['per_s']:8.0f} {h['p50_ms']:6.1f}ms {h['p99_ms']:6.1f}ms "
            f"{h['server_cpu_ms_per_handshake']:6.2f}ms {h['errors']:4}  x{h['per_s'] / base:.2f}"
        )
    print()
    print(
        f"{'sends, full load':24} {'sends/s':>8} {'ack p99':>9} {'cpu':>5} {'us/send':>8} {'err':>4}"
    )
    base = next(iter(r["sends"].values()))["sends_per_s"]
    for name, s in r["sends"].items():
        us = 1e6 * s["server_cpu"] / max(1.0, s["sends_per_s"])
        print(
            f"{name:24} {s['sends_per_s']:8.0f} {s['ack_p99_ms']:7.1f}ms {s['server_cpu']:5.2f} "
            f"{us:8.0f} {s['errors']:4}  x{s['sends_per_s'] / base:.2f}"
        )
    print("\ncpu/hs: chatd server CPU per handshake; us/send: chatd server CPU per acked send.")
