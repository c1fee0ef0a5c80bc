"""When to refresh, and how long to wait after a failure. Pure functions.

Refresh at a fraction of the lifetime (default half, as Envoy and MSAL do):
the other half is the time left to ride out an authorization-server outage.
Jitter of a few percent of the lifetime spreads tokens issued together.

After a failure, back off exponentially with jitter. Transient failures
(unreachable, 5xx, 429) use full jitter under a cap of about 30 s, so many
replicas and servers do not retry in step; a ``Retry-After`` is a floor.
Permanent failures (the credential or request was refused) wait much longer,
with equal jitter so that even the first retry is not immediate: retrying a
bad secret only annoys the authorization server. A new registration resets it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from tokensvc.errors import FetchError, TransientFetchError
from tokensvc.token import Token

# A token so short-lived that half its life is under this is refreshed this
# often anyway, rather than in a tight loop.
MIN_REFRESH_INTERVAL = timedelta(milliseconds=200)
MAX_RETRY_AFTER = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class RefreshPolicy:
    fraction: float = 0.5
    jitter: float = 0.05  # of the lifetime, either way
    backoff_base: timedelta = timedelta(seconds=1)
    backoff_cap: timedelta = timedelta(seconds=30)
    permanent_backoff_base: timedelta = timedelta(seconds=60)
    permanent_backoff_cap: timedelta = timedelta(hours=1)

    def refresh_at(
        self,
        issued_at: datetime,
        expires_at: datetime,
        rng: random.Random,
        fraction: float = 0.0,
    ) -> datetime:
        """When to replace a token: a fraction of its lifetime, jittered, never
        after it expires and never sooner than MIN_REFRESH_INTERVAL."""
        return self._at(issued_at, expires_at, rng.random(), fraction)

    def replace_at(self, token: Token, fraction: float = 0.0) -> datetime:
        """When to replace this token: the same in every replica and after a
        restart, as the jitter is drawn from the token's SHA-256, so the fleet
        wakes together and one of them refreshes while the others wait at the
        lock. (Its first 52 bits: seeding a random.Random with the token cost
        10 µs, twice per refresh.)"""
        draw = int(token.sha256[:13], 16) / (1 << 52)
        return self._at(token.issued_at, token.expires_at, draw, fraction)

    def _at(
        self, issued_at: datetime, expires_at: datetime, draw: float, fraction: float
    ) -> datetime:
        """``draw``: uniform in [0, 1), which places the jitter."""
        lifetime = expires_at - issued_at
        share = fraction or self.fraction
        offset = share + self.jitter * (2 * draw - 1)
        offset = min(max(offset, 0.0), 1.0)
        when = issued_at + lifetime * offset
        return min(max(when, issued_at + MIN_REFRESH_INTERVAL), expires_at)

    def retry_in(self, error: FetchError, failures: int, rng: random.Random) -> timedelta:
        """How long to wait after the ``failures``-th consecutive failure (1 = first)."""
        exponent = min(failures - 1, 30)
        if isinstance(error, TransientFetchError):
            ceiling = min(self.backoff_cap, self.backoff_base * (1 << exponent))
            delay = ceiling * rng.random()
            if error.retry_after is not None:
                hint = min(timedelta(seconds=error.retry_after), MAX_RETRY_AFTER)
                delay = max(delay, hint)
            return delay
        ceiling = min(self.permanent_backoff_cap, self.permanent_backoff_base * (1 << exponent))
        return ceiling / 2 + ceiling / 2 * rng.random()
