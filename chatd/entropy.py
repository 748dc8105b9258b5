"""Where chatd's randomness comes from: the system's, or a seed a simulation gave.

Retry jitter and the ids of replies and processes are the engine's only
random choices. Normally they come from the OS (ids from :mod:`secrets`).
The simulator (``sim/``) seeds them for a whole Trio task tree with
:func:`seed_tree`, so that a run is reproducible from its seed alone, as its
time is from Trio's mock clock. Tasks inherit the seed from the task that
starts them (a context variable), so nothing outside that tree sees it.
"""

from __future__ import annotations

import random
import secrets
from contextvars import ContextVar

_SEEDED: ContextVar[random.Random | None] = ContextVar("chatd_entropy", default=None)


def seed_tree(seed: int) -> None:
    """From now on, this task and every task it starts draws from ``seed``."""
    _SEEDED.set(random.Random(seed))


def new_rng() -> random.Random:
    """A generator of its own for one user (a backoff's jitter)."""
    root = _SEEDED.get()
    return random.Random() if root is None else random.Random(root.getrandbits(64))


def token_hex(nbytes: int) -> str:
    """A random id: cryptographic unless the tree is seeded (a simulation)."""
    root = _SEEDED.get()
    return secrets.token_hex(nbytes) if root is None else root.randbytes(nbytes).hex()
