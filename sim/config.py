"""The settings of every simulated chatd process (the fuzzer's, on mock time).

The peer checkpoints its replies, the other does not, so takeovers mix both
modes. Small numbers put every recovery path within a short program's reach.
"""

from __future__ import annotations

import functools
from typing import Any

from chatd.config import Config, config_from_dict

#: Replies end within lease + sweep once their owner is gone, plus a 40-token
#: reply still generating and its commit (as in the fuzzer).
LEASE, TAKEOVER = 1.0, 0.3
#: Memberships are re-read this often: a revoked member's subscription ends
#: within it (plus one read of the log).
MEMBERSHIP_TTL = 0.5
#: The HMAC secret the simulated clients' tokens are signed with.
SECRET = "sim-" * 16


@functools.cache
def sim_config(*, peer: bool) -> Config:
    """The fuzzer's settings; the peer checkpoints its replies, the other does not."""
    streams: dict[str, Any] = {
        "commit_timeout": 15.0,
        "lease": LEASE,
        "takeover_interval": TAKEOVER,
    }
    if peer:
        streams |= {"persistence": "checkpoint", "checkpoint_interval_ms": 100}
    return config_from_dict(
        {
            # Catch-ups page at about 9 messages, and a client that stops
            # reading for half a second is dropped: both paths within reach.
            "server": {"port": 0, "hello_timeout": 5.0},
            # Tokens, as in production: every client's grants come from its
            # token, and the intruder's from its memberships too (sim/intruder.py).
            "auth": {"mode": "jwt", "secret": SECRET, "membership_ttl": MEMBERSHIP_TTL},
            "store": {"page_bytes": 1024},
            "postgres": {"dsn": "memory:", "command_timeout": 3.0},
            "redis": {"url": "memory:", "command_timeout": 1.0, "connect_timeout": 1.0},
            "relay": {"poll_interval": 0.3},
            "retry": {"backoff_max": 0.3},
            "model": {"fake_tokens": 20, "fake_token_rate": 100.0},
            "streams": streams,
            "limits": {
                "write_timeout": 0.5,
                "send_rate": 0,
                "read_rate": 0,
                "frame_rate": 0,
                "replies_per_connection": 1000,
                "replies_per_user": 1000,
            },
        }
    )
