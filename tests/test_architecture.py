"""The layering, checked: who may import what, and modules that stay readable.

* Only ``chatd/adapters`` touches asyncio, asyncpg, redis or trio-asyncio
  (``chatd/bench`` measures raw baselines with them and is not part of the server).
* The engine depends on the ports, never on an adapter or on the server.
* The bottom layer (records, ports, protocol, config, ...) depends on nothing above it.
* ``chatd.server`` does not pull in the benchmarks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from chatd.engine.ops import OPS
from chatd.protocol import OPS as PROTOCOL_OPS

ROOT = Path(__file__).resolve().parent.parent / "chatd"
ASYNCIO_WORLD = {"asyncio", "asyncpg", "redis", "trio_asyncio", "hiredis"}
BOTTOM = [
    "records",
    "ports",
    "protocol",
    "config",
    "config_checks",
    "config_show",
    "histogram",
    "errors",
    "chaos",
    "backoff",
    "entropy",
    "shutdown",
    "identity",
    "limits",
    "tokens",
    # Durable Streams' rules: pure functions, shared by both stores and the HTTP face.
    "durable.model",
]
#: "Under ~400 lines": a little slack, so the rule bites only on real growth.
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    return out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def test_only_the_adapters_cross_into_asyncio():
    offenders = {
        mod: sorted(bad)
        for mod, path in _modules().items()
        if not mod.startswith(("chatd.adapters", "chatd.bench"))
        and (bad := {i for i in _imports(path) if _top(i) in ASYNCIO_WORLD})
    }
    assert offenders == {}, f"asyncio-side imports outside chatd/adapters: {offenders}"


def test_the_engine_depends_on_ports_not_on_adapters_or_the_server():
    offenders = {
        mod: sorted(bad)
        for mod, path in _modules().items()
        if mod.startswith("chatd.engine")
        and (
            bad := {
                i
                for i in _imports(path)
                if i.startswith(("chatd.adapters", "chatd.server", "chatd.cli", "chatd.bench"))
            }
        )
    }
    assert offenders == {}, offenders


def test_the_bottom_layer_depends_on_nothing_above_it():
    modules = _modules()
    offenders = {}
    for name in BOTTOM:
        mod = f"chatd.{name}"
        above = {
            i
            for i in _imports(modules[mod])
            if i.startswith("chatd.")
            and i.removeprefix("chatd.") not in BOTTOM
            and i.removeprefix("chatd.").split(".")[0] not in BOTTOM
        }
        if above:
            offenders[mod] = sorted(above)
    assert offenders == {}, offenders


def test_the_server_does_not_import_the_benchmarks():
    code = "import sys, chatd.server; print(sorted(m for m in sys.modules if m.startswith('chatd.bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_modules_stay_small():
    big = {
        mod: n
        for mod, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}, f"modules over {MAX_LINES} lines: {big}"


def test_every_op_of_the_protocol_has_a_handler():
    assert set(OPS) == set(PROTOCOL_OPS)
