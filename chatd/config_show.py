"""The configuration as printed (``chatd config``, logs): every secret masked."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatd.config import Config


def as_dict(config: Config) -> dict[str, Any]:
    """The configuration as plain data (for ``chatd config`` and logs); secrets masked,
    passwords in DSNs included."""
    data = dataclasses.asdict(config)
    for section, key in _SECRETS:
        if data[section][key]:
            data[section][key] = "***"
    for section, key in (("postgres", "dsn"), ("redis", "url")):
        data[section][key] = mask_url(data[section][key])
    return data


def mask_url(url: str) -> str:
    """``scheme://user:***@host/...``: a DSN or URL with its password hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user, colon, _password = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


#: Keys whose values are never printed or logged.
_SECRETS = (("model", "api_key"), ("http", "operator_token"), ("auth", "secret"))
