"""GetToken answered again without deciding everything again.

A broker asks for the same token, with the same key, thousands of times a
second, and between rotations each of those calls gets the same bytes after
the same checks: whose key it is, whether that caller may have the server's
tokens, whether the token held is fresh enough for the request. So a call that
went the whole way and succeeded leaves its conclusion here, under its exact
request bytes and its credential (:meth:`Authenticator.credential`), and a
later call with the same bytes and credential gets the same token for as long
as nothing those checks depended on has changed:

- the callers have not been loaded again since (a revocation, a new caller,
  the end of open mode: :attr:`Authenticator.generation`);
- the manager still holds that very token for the server (a rotation, a new
  revision or a deletion replaces or drops it);
- it is still fresh enough for the request, on the service's clock.

Everything else takes the whole way: another request or credential, a caller
known by its client certificate, a request reporting a rejected token. What
the whole way records is not lost: the audit records an issuance once per
caller, server and token version, which the first call did, and the caller's
last use is stamped on every call. At most MAX_REMEMBERED conclusions are
kept, the oldest going first; they hold the token weakly, so none outlives it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta

from tokensvc.auth import Authenticator, Caller
from tokensvc.held import ServerState
from tokensvc.manager import TokenManager
from tokensvc.token import Clock, ServerToken

# A fleet's (broker key, server) pairs; under 0.75 kB each (measured with all that
# a first call keeps), so at most about 12 MB.
MAX_REMEMBERED = 16_384

# (authorization header, peer, request bytes): see Authenticator.credential.
Key = tuple[str, str, bytes]


@dataclass(frozen=True, slots=True)
class _Concluded:
    caller: Caller
    held: weakref.ref[ServerToken]
    state: ServerState  # where the manager holds the server's token
    fresh_until: datetime
    generation: int


class RepeatedCalls:
    def __init__(self, manager: TokenManager, auth: Authenticator, clock: Clock) -> None:
        self._manager = manager
        self._auth = auth
        self._clock = clock
        self._concluded: dict[Key, _Concluded] = {}

    def answer(self, key: Key) -> ServerToken | None:
        """The token a call identified by ``key`` gets, if concluded already."""
        concluded = self._concluded.get(key)
        if concluded is None:
            return None
        held = concluded.held()
        if (
            held is None
            or concluded.state.token is not held
            or concluded.generation != self._auth.generation
        ):
            return None
        now = self._clock()
        if now > concluded.fresh_until:
            return None
        self._auth.stamp(concluded.caller, now)
        return held

    def remember(
        self, key: Key, generation: int, caller: Caller, held: ServerToken, wanted: timedelta
    ) -> None:
        """A call identified by ``key``, made by ``caller`` as the callers were
        at ``generation`` (read before it was authenticated), asking for a
        token valid ``wanted``, went the whole way and got ``held``."""
        if len(self._concluded) >= MAX_REMEMBERED:
            del self._concluded[next(iter(self._concluded))]  # the oldest
        self._concluded[key] = _Concluded(
            caller,
            weakref.ref(held),
            self._manager.servers.get(held.server_id),
            held.token.fresh_until(wanted),
            generation,
        )
