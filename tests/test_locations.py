"""Where chatd reads its config and keeps its data: found the same way from anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatd import locations
from chatd.config import load_config


@pytest.fixture(params=[False, True], ids=["user", "root"])
def root(request, monkeypatch):
    monkeypatch.setattr(locations, "_is_root", lambda: request.param)
    return request.param


def test_config_file_search_order(tmp_path, root):
    home = tmp_path / "home"
    env = {"HOME": str(home)}
    cwd = tmp_path / "work"
    cwd.mkdir()
    assert locations.config_file(None, env, cwd) is None  # nothing: all defaults
    if not root:
        user = home / ".config" / "chatd" / "chatd.toml"
        user.parent.mkdir(parents=True)
        user.write_text("")
        assert locations.config_file(None, env, cwd) == user
    (cwd / "chatd.toml").write_text("")
    assert locations.config_file(None, env, cwd) == cwd / "chatd.toml"
    assert locations.config_file(None, {**env, "CHATD_CONFIG": "/x.toml"}, cwd) == Path("/x.toml")
    assert locations.config_file("/y.toml", {"CHATD_CONFIG": "/x.toml"}, cwd) == Path("/y.toml")
    # The repository's reference config.toml is never picked up by itself.
    (cwd / "chatd.toml").unlink()
    (cwd / "config.toml").write_text("")
    found = locations.config_file(None, env, cwd)
    assert found is None or found.name == "chatd.toml"


def test_data_dir_is_resolved_against_the_config_file(tmp_path, root):
    conf = tmp_path / "etc" / "chatd.toml"
    conf.parent.mkdir()
    conf.write_text('[embedded]\ndata_dir = "var"\n')
    env = {"HOME": str(tmp_path / "home")}
    cfg = locations.with_data_dir(load_config(conf, {}), conf, env)
    assert cfg.embedded.data_dir == str(tmp_path / "etc" / "var")
    default = locations.with_data_dir(load_config(None, {}), None, env)
    expected = "/var/lib/chatd" if root else str(tmp_path / "home" / ".local/share/chatd")
    assert default.embedded.data_dir == expected


def test_init_writes_a_config_that_loads(tmp_path):
    run = [sys.executable, "-m", "chatd.cli"]
    r = subprocess.run([*run, "init"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert load_config(tmp_path / "chatd.toml", {}).embedded.data_dir == "var"
    again = subprocess.run(
        [*run, "init"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert again.returncode == 1 and "exists" in again.stderr
    # From anywhere else, --config finds the same data directory.
    shown = subprocess.run(
        [*run, "--config", str(tmp_path / "chatd.toml"), "config"],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert f'"data_dir": "{tmp_path / "var"}"' in shown.stdout
