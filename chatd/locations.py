"""Where chatd finds its config file and keeps its data, for root and for users.

The config file, the first that exists of: ``--config``, ``$CHATD_CONFIG``,
``./chatd.toml``, then ``$XDG_CONFIG_HOME/chatd/chatd.toml`` (normally
``~/.config/chatd/chatd.toml``), or ``/etc/chatd/chatd.toml`` as root. The
repository's ``config.toml`` is the reference (every key at its default) and
is never read by itself: editing a copy never dirties a checkout.

The data directory of the embedded servers (``[embedded].data_dir``): a
relative path is taken from the config file's directory (not from wherever
chatd happens to be started); empty means the user's data directory:
``$XDG_DATA_HOME/chatd`` (normally ``~/.local/share/chatd``), or
``/var/lib/chatd`` as root. Root's default matters: PostgreSQL refuses to run
as root, so it runs as another user who cannot enter ``/root``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from chatd.config import Config

_NAME = "chatd.toml"


def _is_root() -> bool:
    return os.geteuid() == 0


def config_file(explicit: str | None, env: Mapping[str, str], cwd: Path) -> Path | None:
    """The config file to read, or None (all defaults)."""
    if explicit:
        return Path(explicit)
    if env.get("CHATD_CONFIG"):
        return Path(env["CHATD_CONFIG"])
    candidates = [cwd / _NAME]
    if _is_root():
        candidates.append(Path("/etc/chatd") / _NAME)
    else:
        candidates.append(_xdg(env, "XDG_CONFIG_HOME", ".config") / "chatd" / _NAME)
    return next((c for c in candidates if c.is_file()), None)


def default_data_dir(env: Mapping[str, str]) -> Path:
    if _is_root():
        return Path("/var/lib/chatd")
    return _xdg(env, "XDG_DATA_HOME", ".local/share") / "chatd"


def with_data_dir(config: Config, config_file: Path | None, env: Mapping[str, str]) -> Config:
    """``config`` with ``[embedded].data_dir`` made absolute (see the module doc)."""
    raw = config.embedded.data_dir
    if not raw:
        path = default_data_dir(env)
    else:
        path = Path(raw).expanduser()
        if not path.is_absolute():
            base = config_file.resolve().parent if config_file else Path.cwd()
            path = base / path
    return replace(config, embedded=replace(config.embedded, data_dir=str(path)))


def _xdg(env: Mapping[str, str], var: str, fallback: str) -> Path:
    if env.get(var):
        return Path(env[var])
    return Path(env.get("HOME") or Path.home()) / fallback
