"""Who a client is and what it may do: user names, grants, and the rights they give.

Pure data and rules, no I/O. A user's rights on a conversation are the union
of its token's grants (:class:`Grants`, from the token's claim) and its
membership rows (read by :mod:`chatd.engine.access`). Rights are ``r`` (read:
subscribe, history) and ``w`` (write: send, typing, stop a reply).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: Longest user name or ``sub``, in characters.
USER_MAX = 64
#: Unicode categories no name may contain: controls, format characters (bidi
#: overrides, zero-width spaces and joiners), separators other than the plain
#: space, private use, surrogates, unassigned.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"})
#: Patterns in a grants claim, at most.
_MAX_PATTERNS = 1000
#: Conversations whose rights a token remembers once matched.
_MEMO = 256


class IdentityError(ValueError):
    """A name or a grants claim that cannot be accepted; the message says why."""


def _folded(name: str) -> str:
    # "Assistant", "assistant" and the same word in full-width letters are one name.
    return unicodedata.normalize("NFKC", name).casefold()


def check_user(name: Any, reserved: Iterable[str]) -> str:
    """``name`` if a client may be known by it, else IdentityError saying why."""
    if not isinstance(name, str) or not name:
        raise IdentityError("a user name must be a non-empty string")
    if len(name) > USER_MAX:
        raise IdentityError(f"a user name is at most {USER_MAX} characters")
    if name != name.strip():
        raise IdentityError("a user name must not start or end with white space")
    for ch in name:
        cat = unicodedata.category(ch)
        if cat in _FORBIDDEN_CATEGORIES or (cat == "Zs" and ch != " "):
            raise IdentityError(
                f"a user name must not contain U+{ord(ch):04X} ({unicodedata.name(ch, cat)})"
            )
    if _folded(name) in {_folded(r) for r in reserved}:
        raise IdentityError(f"the user name {name!r} is reserved")
    return name


def merge_rights(a: str, b: str) -> str:
    """Both sets of rights, as ``""``, ``"r"``, ``"w"`` or ``"rw"``."""
    return "".join(r for r in "rw" if r in a or r in b)


@dataclass(frozen=True)
class Grants:
    """What a token (or anonymous mode) allows, conversation by conversation."""

    #: (conversation id or "prefix*", rights), as the claim listed them.
    convs: tuple[tuple[str, str], ...] = ()
    #: May use the operator ops (``status``).
    operator: bool = False
    #: Every conversation, read and write (anonymous mode).
    everything: bool = False
    #: (Durable Streams path or "prefix*", rights), as the claim's "streams" listed them.
    streams: tuple[tuple[str, str], ...] = ()
    _exact: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    _prefixes: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    _memo: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        exact: dict[str, str] = {}
        prefixes = []
        for pattern, rights in self.convs:
            if pattern.endswith("*"):
                prefixes.append((pattern[:-1], rights))
            else:
                exact[pattern] = merge_rights(exact.get(pattern, ""), rights)
        self._exact.update(exact)
        object.__setattr__(self, "_prefixes", tuple(prefixes))

    def rights(self, conv: str) -> str:
        """``""``, ``"r"``, ``"w"`` or ``"rw"``: everything that matches, together."""
        if self.everything:
            return "rw"
        known = self._memo.get(conv)
        if known is not None:
            return known
        out = self._exact.get(conv, "")
        for prefix, rights in self._prefixes:
            if conv.startswith(prefix):
                out = merge_rights(out, rights)
        if len(self._memo) < _MEMO:
            # Every op checks rights, and a client uses few conversations.
            self._memo[conv] = out
        return out

    def stream_rights(self, path: str) -> str:
        """The rights on the Durable Stream at ``path`` (``streams`` patterns)."""
        if self.everything:
            return "rw"
        out = ""
        for pattern, rights in self.streams:
            if path == pattern or (pattern.endswith("*") and path.startswith(pattern[:-1])):
                out = merge_rights(out, rights)
        return out

    @classmethod
    def from_claim(cls, claim: Any) -> Grants:
        """Grants from a token's claim: ``{"convs": {"c1": "rw", "team-*": "r"}, "operator": true}``."""
        if claim is None:
            return cls()
        if not isinstance(claim, dict):
            raise IdentityError("the grants claim must be an object")
        convs = claim.get("convs", {})
        if not isinstance(convs, dict) or len(convs) > _MAX_PATTERNS:
            raise IdentityError(
                f"the grants claim's 'convs' must be an object of at most {_MAX_PATTERNS} "
                "conversation ids or prefixes"
            )
        pairs = _patterns(convs)
        streams = claim.get("streams", {})
        if not isinstance(streams, dict) or len(streams) > _MAX_PATTERNS:
            raise IdentityError(
                f"the grants claim's 'streams' must be an object of at most {_MAX_PATTERNS} "
                "stream paths or prefixes"
            )
        operator = claim.get("operator", False)
        if not isinstance(operator, bool):
            raise IdentityError("the grants claim's 'operator' must be true or false")
        return cls(tuple(pairs), operator, streams=tuple(_patterns(streams)))


def _patterns(grants: dict[Any, Any]) -> list[tuple[str, str]]:
    pairs = []
    for pattern, rights in grants.items():
        if not pattern or not isinstance(rights, str) or not set(rights) <= {"r", "w"}:
            raise IdentityError(
                f"grant {pattern!r}: rights must be 'r', 'w' or 'rw', got {rights!r}"
            )
        pairs.append((pattern, merge_rights(rights, "")))
    return pairs


@dataclass(frozen=True)
class Identity:
    user: str
    grants: Grants
    #: When the token expires, on Trio's clock; None: never (anonymous).
    expires_at: float | None = None
    #: How the client proved it: "anonymous" or "token".
    via: str = "anonymous"
