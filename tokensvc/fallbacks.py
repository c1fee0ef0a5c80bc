"""A token request with its fallbacks: the previous credential while a secret
is being rotated, and the token endpoint discovered again when it stops answering."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta

from tokensvc.discovery import Discovery
from tokensvc.errors import AuthorizationServerUnavailable, CredentialsRejected, InvalidArgument
from tokensvc.registration import Credential, ServerSpec
from tokensvc.store import FetchContext, ServerRecord, Store
from tokensvc.token import Clock, Token

log = logging.getLogger(__name__)

Fetch = Callable[[ServerSpec, Credential], Awaitable[Token]]

# A discovered token endpoint that stops answering is looked up again at most this often.
REDISCOVER_INTERVAL = timedelta(minutes=5)


class Fallbacks:
    def __init__(
        self,
        store: Store,
        fetch: Fetch,
        discover: Callable[[ServerSpec], Awaitable[Discovery]] | None,
        clock: Clock,
    ) -> None:
        self._store = store
        self._fetch = fetch
        self._discover = discover
        self._clock = clock

    async def fetch_for(self, context: FetchContext) -> tuple[Token, str]:
        """A token for the server, and which credential got it."""
        spec = context.record.effective_spec
        try:
            return await self._fetch(spec, context.credential), "current"
        except CredentialsRejected:
            if context.previous is None:
                raise
            # A secret being rotated: the new one is not live yet at the
            # provider; the previous one, kept for this, still is.
            return await self._fetch(spec, context.previous), "previous"
        except AuthorizationServerUnavailable:
            moved = await self._rediscover(context.record)
            if moved is None:
                raise
            return await self._fetch(moved.effective_spec, context.credential), "current"

    async def _rediscover(self, record: ServerRecord) -> ServerRecord | None:
        """A discovered token endpoint that stopped answering may have moved:
        discover again (at most every REDISCOVER_INTERVAL). The record with the
        new endpoint, or None if nothing changed."""
        found, now = record.discovery, self._clock()
        if self._discover is None or found is None:
            return None
        if found.time is not None and now - found.time < REDISCOVER_INTERVAL:
            return None
        try:
            fresh = await self._discover(record.spec)
        except InvalidArgument as exc:
            log.warning(
                "discovery failed again",
                extra={"server_id": record.spec.id, "reason": exc.message},
            )
            fresh = replace(found, time=now)  # tried: do not try again at once
        await self._store.set_discovery(record.spec.id, record.incarnation, record.revision, fresh)
        if fresh.token_endpoint == found.token_endpoint:
            return None
        log.info(
            "token endpoint moved",
            extra={"server_id": record.spec.id, "token_endpoint": fresh.token_endpoint},
        )
        return replace(record, discovery=fresh)
