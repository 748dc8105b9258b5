"""Node.js for the suite: the JavaScript client's and the chat page's tests
(``clients/js``) run in it, against chatd servers the Python tests start."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

JS = Path(__file__).resolve().parent.parent / "clients" / "js"


def node() -> list[str]:
    """The command that runs Node.js here (>= 20.10, with a global WebSocket)."""
    exe = shutil.which("node")
    if exe is None:
        pytest.fail("the JavaScript client's tests need Node.js >= 20.10 on PATH (node not found)")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    major, minor = (int(x) for x in version.stdout.strip().lstrip("v").split(".")[:2])
    if (major, minor) < (20, 10):
        pytest.fail(f"the JavaScript client's tests need Node.js >= 20.10, not {version.stdout}")
    has_ws = subprocess.run(
        [exe, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], check=False
    )
    return [exe] if has_ws.returncode == 0 else [exe, "--experimental-websocket"]


async def run_node_tests(directory: Path, env: dict[str, str], seconds: float) -> str:
    """``node --test`` on ``directory`` (its spec report is returned and printed);
    fails unless every test ran and passed."""
    with trio.fail_after(seconds):
        done = await trio.run_process(
            [*node(), "--test", "--test-reporter=spec", str(directory)],
            env={**os.environ, **env},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    print(out)
    assert done.returncode == 0, f"node --test {directory.name} failed:\n{out}"
    assert "\N{INFORMATION SOURCE} fail 0" in out, out  # node's spec reporter
    assert "\N{INFORMATION SOURCE} pass 0" not in out, out
    return out
