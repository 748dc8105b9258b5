"""Configuration: the shipped config.toml is the defaults; bad config names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatd.config import Config, ConfigError, as_dict, config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_toml_lists_exactly_the_defaults():
    assert load_config(ROOT / "config.toml", {}) == Config()


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"server": {"prot": 1}}, "[server].prot"),
        ({"nope": {}}, "[nope]"),
        ({"server": {"port": "80"}}, "[server].port"),
        ({"streams": {"max_streams": 0}}, "[streams].max_streams"),
        ({"model": {"backend": "gpt"}}, "[model].backend"),
        ({"model": {"backend": "openai"}}, "[model].model"),
        ({"chaos": {"enabled": True}}, "[http].operator_token"),
        ({"chaos": {"admin_token": "t" * 32}}, "[http].operator_token"),
        ({"chaos": {"port": 8766}}, "[http].operator_listen"),
        ({"http": {"operator_token": "short"}}, "[http].operator_token"),
        ({"http": {"operator_listen": "8766"}}, "[http].operator_listen"),
        ({"http": {"operator_listen": "127.0.0.1:99999"}}, "[http].operator_listen"),
        ({"http": {"metrics_auth": True}}, "[http].metrics_auth"),
        ({"http": {"max_connections": 0}}, "[http].max_connections"),
        ({"log": {"format": "xml"}}, "[log].format"),
        ({"relay": {"poll_interval": -1}}, "[relay].poll_interval"),
        ({"relay": {"backoff_max": 1}}, "[retry].backoff_max"),
        ({"server": {"allow_anonymous": True}}, "[auth].mode"),
        ({"auth": {"mode": "oauth"}}, "[auth].mode"),
        ({"auth": {"mode": "jwt"}}, "[auth].secret"),
        ({"auth": {"mode": "jwt", "secret": "s" * 40, "algorithms": ["HS512"]}}, "[auth].secret"),
        ({"auth": {"mode": "jwt", "algorithms": ["ES256"]}}, "[auth]"),
        ({"auth": {"algorithms": "HS256"}}, "[auth].algorithms"),
        ({"limits": {"send_burst": 0}}, "[limits].send_burst"),
        ({"server": {"gc_thresholds": [700, 10]}}, "[server].gc_thresholds"),
        ({"server": {"gc_thresholds": ["700", 10, 10]}}, "[server].gc_thresholds"),
        ({"server": {"workers": 0}}, "[server].workers"),
        ({"server": {"asyncio_bridge": "uvloop"}}, "[server].asyncio_bridge"),
        (
            {
                "server": {"workers": 2},
                "chaos": {"enabled": True},
                "http": {"operator_token": "t" * 32},
            },
            "[chaos]",
        ),
        ({"postgres": {"reads_in_flight": 10}}, "[postgres].reads_in_flight"),
        ({"store": {"join_batch": 0}}, "[store].join_batch"),
        ({"store": {"page_bytes": 10}}, "[store].page_bytes"),
    ],
)
def test_bad_config_names_the_key(data, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(data)


def test_environment_overrides_and_secrets_are_masked():
    cfg = load_config(
        None,
        {
            "CHATD_POSTGRES_DSN": "postgresql://x@h/db",
            "CHATD_MODEL_API_KEY": "sk-secret",
            "CHATD_OPERATOR_TOKEN": "t" * 20,
            "CHATD_AUTH_SECRET": "s" * 40,
        },
    )
    assert cfg.auth.secret == "s" * 40
    assert cfg.postgres.dsn == "postgresql://x@h/db"
    assert cfg.model.api_key == "sk-secret"
    shown = as_dict(cfg)
    assert shown["model"]["api_key"] == "***" and shown["http"]["operator_token"] == "***"
    assert shown["auth"]["secret"] == "***"
