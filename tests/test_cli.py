"""What a user can get wrong at start: one line on stderr naming the fix, a non-zero exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from chatd import __name__ as _pkg  # noqa: F401  (the package under test is importable)


def _chatd(*args: str, env: dict[str, str] | None = None, cwd: str | None = None):
    base = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    return subprocess.run(
        [sys.executable, "-m", "chatd.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=cwd,
        timeout=120,
        check=False,
    )


def _one_line(stderr: str) -> str:
    """The error line; log lines (timestamped) around it are not errors."""
    lines = [ln for ln in stderr.splitlines() if ln and not ln[:4].isdigit()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["serve", "--port", "99999"], "99999 is not a port (0..65535"),
        (["serve", "--port", "-1"], "-1 is not a port"),
        (["serve", "--port", "http"], "'http' is not a port number"),
        (["serve", "--workers", "0"], "0 workers: use 1 to 64"),
    ],
)
def test_bad_flags(args, named):
    r = _chatd(*args)
    assert r.returncode == 2
    assert named in r.stderr.splitlines()[-1], r.stderr


def test_version():
    r = _chatd("--version")
    assert r.returncode == 0 and r.stdout.startswith("chatd ")


def test_bad_config_key_is_one_line(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("[server]\nprot = 1\n")
    r = _chatd("--config", str(conf), "serve")
    assert r.returncode == 2
    assert _one_line(r.stderr) == "chatd: configuration error: unknown config key [server].prot"


def test_unreachable_postgres_is_one_line_without_the_password(tmp_path):
    # Startup retries for 3 x connect_timeout: 1 s keeps the test short.
    conf = tmp_path / "chatd.toml"
    conf.write_text("[postgres]\nconnect_timeout = 1.0\n")
    r = _chatd(
        "--config",
        str(conf),
        "serve",
        env={
            "CHATD_POSTGRES_DSN": "postgresql://chatd:hunter2-secret@127.0.0.1:1/chatd",
            "CHATD_REDIS_URL": "redis://:other-secret@127.0.0.1:2/0",
        },
    )
    assert r.returncode == 1
    line = _one_line(r.stderr)
    assert line.startswith("chatd: cannot connect to Postgres:") and "CHATD_POSTGRES_DSN" in line
    assert "hunter2" not in r.stderr and "other-secret" not in r.stderr


def test_port_in_use_is_one_line(postgres, redis_server):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = _chatd(
            "serve",
            "--port",
            str(port),
            env={"CHATD_POSTGRES_DSN": postgres.dsn, "CHATD_REDIS_URL": redis_server.url},
        )
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert line == (
        f"chatd: configuration error: [server].host/port: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    ), line


def test_config_masks_every_secret():
    r = _chatd(
        "config",
        env={
            "CHATD_POSTGRES_DSN": "postgresql://chatd:hunter2-secret@db.example.com/chatd",
            "CHATD_REDIS_URL": "redis://:other-secret@cache.example.com:6379/0",
            "CHATD_OPERATOR_TOKEN": "operator-secret-0123456789",
            "CHATD_AUTH_SECRET": "s" * 40,
        },
    )
    assert r.returncode == 0
    for secret in ("hunter2", "other-secret", "operator-secret", "s" * 40):
        assert secret not in r.stdout
    assert "postgresql://chatd:***@db.example.com/chatd" in r.stdout
    assert "redis://:***@cache.example.com:6379/0" in r.stdout


def test_a_closed_pipe_is_not_an_error():
    # `chatd config | head -1`: the reader leaves after one line.
    proc = subprocess.Popen(
        f"{sys.executable} -m chatd.cli config | head -1",
        shell=True,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert out.strip() == "{" and "Traceback" not in err and "BrokenPipe" not in err
