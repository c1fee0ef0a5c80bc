"""TokenManager: the policy. Cache, single flight per server, compare-and-refresh.

It reads like the spec: serve the cached token if it is valid long enough;
otherwise join the one refresh in flight for that server, or start it. A
refresh first looks at the store (a token saved before a restart, or by
another process, is taken instead of fetched), then asks the authorization
server and saves the result under the revision it was fetched for. Failures
are never cached; a token still valid is served through an outage.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from tokensvc.errors import FetchError, RegistrationChanged
from tokensvc.registration import Credential, ServerSpec
from tokensvc.store import Store
from tokensvc.token import Clock, ServerToken, Token, utcnow

log = logging.getLogger(__name__)

Fetch = Callable[[ServerSpec, Credential], Awaitable[Token]]

# A refresh that keeps meeting a newer registration gives up after this many
# rounds rather than loop while an admin (or a reconciler gone wrong) edits.
MAX_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class _Flight:
    task: asyncio.Task[ServerToken]
    # The token version this refresh was started to replace (0: none).
    replaces: int


class TokenManager:
    def __init__(
        self,
        store: Store,
        fetch: Fetch,
        *,
        clock: Clock = utcnow,
        min_valid_for: timedelta = timedelta(seconds=5),
    ) -> None:
        self._store = store
        self._fetch = fetch
        self._clock = clock
        self.min_valid_for = min_valid_for
        self._cache: dict[str, ServerToken] = {}
        self._flights: dict[str, _Flight] = {}
        # Bumped whenever a server's registration changes or it is deleted: a
        # refresh that saw another epoch must not publish what it fetched.
        self._epochs: dict[str, int] = {}

    # the request path ------------------------------------------------------

    async def get_token(
        self,
        server_id: str,
        min_valid_for: timedelta | None = None,
        rejected_sha256: str = "",
    ) -> ServerToken:
        """A token for the server, valid at least ``min_valid_for`` (capped at
        half the token's lifetime, so asking for more than tokens live never
        turns every call into a fetch).

        ``rejected_sha256`` names a token a resource server refused: if it is
        the current one, it is replaced (once, however many report it);
        otherwise the current token is returned as it is.
        """
        wanted = self.min_valid_for if min_valid_for is None else min_valid_for
        cached = self._cache.get(server_id)
        if cached is not None:
            rejected = bool(rejected_sha256) and cached.token.sha256 == rejected_sha256.lower()
            if not rejected and self._fresh_enough(cached, wanted):
                return cached
            replaces = cached.version if rejected else 0
        else:
            replaces = 0
        return await self._join_refresh(server_id, replaces, wanted, rejected_sha256)

    def _fresh_enough(self, held: ServerToken, wanted: timedelta) -> bool:
        return held.token.valid_for(min(wanted, held.token.lifetime / 2), self._clock())

    async def _join_refresh(
        self, server_id: str, replaces: int, wanted: timedelta, rejected_sha256: str
    ) -> ServerToken:
        flight = self._flights.get(server_id)
        if flight is None or flight.replaces < replaces:
            # A refresh running for an older reason may bring back the very
            # token being reported; chain a new one behind it instead.
            previous = flight.task if flight is not None else None
            task = asyncio.create_task(
                self._refresh(server_id, replaces, wanted, rejected_sha256, previous),
                name=f"refresh:{server_id}",
            )
            flight = _Flight(task, replaces)
            self._flights[server_id] = flight
            task.add_done_callback(functools.partial(self._flight_done, server_id))
        # shield: a caller that gives up must not cancel the refresh the others wait for.
        return await asyncio.shield(flight.task)

    def _flight_done(self, server_id: str, task: asyncio.Task[ServerToken]) -> None:
        current = self._flights.get(server_id)
        if current is not None and current.task is task:
            del self._flights[server_id]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not logged as lost

    async def _refresh(
        self,
        server_id: str,
        replaces: int,
        wanted: timedelta,
        rejected_sha256: str,
        previous: asyncio.Task[ServerToken] | None,
    ) -> ServerToken:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
            held = self._cache.get(server_id)
            if held is not None and held.version > replaces and self._fresh_enough(held, wanted):
                return held
        for _ in range(MAX_ROUNDS):
            epoch = self._epochs.get(server_id, 0)
            context = await self._store.load_for_fetch(server_id)
            stored = context.token
            if (
                stored is not None
                and stored.version > replaces
                and stored.token.sha256 != rejected_sha256.lower()
                and self._fresh_enough(stored, wanted)
            ):
                self._remember(server_id, epoch, stored)
                return stored
            record = context.record
            try:
                token = await self._fetch(record.spec, context.credential)
            except FetchError as exc:
                log.warning(
                    "token request failed",
                    extra={"server_id": server_id, "reason": exc.reason, "error": exc.oauth.error},
                )
                await self._store.record_failure(
                    server_id, record.incarnation, record.revision, exc
                )
                fallback = self._cache.get(server_id)
                if (
                    fallback is not None
                    and fallback.version > replaces
                    and fallback.token.expires_at > self._clock()
                ):
                    return fallback  # outage: the token still valid is served until it expires
                raise
            saved = await self._store.save_token(
                server_id, record.incarnation, record.revision, token
            )
            if saved is None or self._epochs.get(server_id, 0) != epoch:
                log.info(
                    "fetched token discarded: the registration changed meanwhile",
                    extra={"server_id": server_id, "revision": record.revision},
                )
                continue
            log.info(
                "token fetched",
                extra={
                    "server_id": server_id,
                    "version": saved.version,
                    "expires_at": saved.token.expires_at.isoformat(),
                },
            )
            self._remember(server_id, epoch, saved)
            return saved
        raise RegistrationChanged(server_id)

    def _remember(self, server_id: str, epoch: int, held: ServerToken) -> None:
        if self._epochs.get(server_id, 0) != epoch:
            return
        current = self._cache.get(server_id)
        if current is None or held.version >= current.version:
            self._cache[server_id] = held

    # registration changes -------------------------------------------------

    def invalidate(self, server_id: str) -> None:
        """The registration changed or the server is gone: forget its token,
        and make any refresh in flight discard what it fetches."""
        self._epochs[server_id] = self._epochs.get(server_id, 0) + 1
        self._cache.pop(server_id, None)

    def cached(self, server_id: str) -> ServerToken | None:
        return self._cache.get(server_id)
