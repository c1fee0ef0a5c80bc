"""The values that flow through tokensvc: secrets and tokens that redact themselves."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

# How long a served token must stay valid when the caller does not say: long
# enough to reach the broker, then the MCP server, with the clocks of all three
# a little apart.
DEFAULT_MIN_VALID_FOR = timedelta(seconds=5)


def fresh_enough(
    issued_at: datetime, expires_at: datetime, wanted: timedelta, now: datetime
) -> bool:
    """The one freshness rule, for tokensvc and its broker client alike: still
    valid ``wanted`` from ``now``, where asking for more than half the lifetime
    counts as asking for half (or every call on short-lived tokens would be a
    fetch, as every refresh comes at about half the lifetime)."""
    return now <= fresh_until(issued_at, expires_at, wanted)


def fresh_until(issued_at: datetime, expires_at: datetime, wanted: timedelta) -> datetime:
    """The last moment at which a token is :func:`fresh_enough` for ``wanted``."""
    return expires_at - min(wanted, (expires_at - issued_at) / 2)


def jwt_expiry(text: str) -> datetime | None:
    """The ``exp`` claim of a compact JWT, unverified: tokensvc is not its
    audience, only its courier (the receiving server verifies it)."""
    parts = text.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    try:
        claims = json.loads(
            base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)),
            parse_constant=float,  # NaN and Infinity are no expiry: refused below
        )
        exp = claims.get("exp") if isinstance(claims, dict) else None
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            return None
        return datetime.fromtimestamp(exp, UTC)
    except (ValueError, OverflowError, OSError, RecursionError):
        return None


class Clock(Protocol):
    """Returns the current time as an aware UTC datetime. Injected for tests."""

    def __call__(self) -> datetime: ...


def utcnow() -> datetime:
    return datetime.now(UTC)


class Secret:
    """A string that never shows itself in a repr, str, log line or traceback.

    Call :meth:`reveal` at the one place that must send it over the wire.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Token:
    """An access token with an absolute expiry, computed once when it arrived.

    The wire's ``expires_in`` is relative to a moment we never learn exactly;
    ``expires_at`` is fixed from our own clock at receipt, which errs on the
    early side by the time the response took.
    """

    access_token: str = field(repr=False)
    token_type: str
    issued_at: datetime
    expires_at: datetime
    scopes: tuple[str, ...] = ()

    @property
    def lifetime(self) -> timedelta:
        return self.expires_at - self.issued_at

    @property
    def sha256(self) -> str:
        return sha256_hex(self.access_token)

    def fresh_enough(self, wanted: timedelta, now: datetime) -> bool:
        return fresh_enough(self.issued_at, self.expires_at, wanted, now)

    def fresh_until(self, wanted: timedelta) -> datetime:
        return fresh_until(self.issued_at, self.expires_at, wanted)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class ServerToken:
    """A token as held for one server: which rotation it is, and under which
    registration revision it was fetched (a token of an older revision is
    never served). Weakly referable, so that what is derived from it (its
    serialized response) can go when it goes."""

    server_id: str
    token: Token
    version: int
    revision: int
