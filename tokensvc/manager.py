"""TokenManager: the policy. Cache, single flight, schedule, backoff, events.

It reads like the spec: serve the cached token if it is valid long enough;
otherwise join the one refresh in flight for that server, or start it. A
refresh first looks at the store (a token saved before a restart, or by
another process, is taken instead of fetched), then asks the authorization
server and saves the result under the revision it was fetched for. Every
token is replaced ahead of expiry by one scheduler for all servers; failures
back off (see policy.py) and are never served as tokens; a token still valid
is served through an outage, never after its expiry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from tokensvc import metrics
from tokensvc.discovery import Discovery
from tokensvc.errors import (
    AuthorizationServerUnavailable,
    CredentialsRejected,
    CredentialUnavailable,
    FetchError,
    InvalidArgument,
    InvalidTokenResponse,
    OAuthErrorFields,
    RegistrationChanged,
    StoreUnavailable,
    TokenRequestRejected,
    TransientFetchError,
)
from tokensvc.events import (
    Event,
    EventBus,
    FetchFailed,
    ServerRemoved,
    TokenIssued,
    TokenRevoked,
)
from tokensvc.policy import RefreshPolicy
from tokensvc.registration import Credential, ServerSpec
from tokensvc.scheduler import Scheduler
from tokensvc.store import FetchContext, LastError, ServerRecord, Store
from tokensvc.store.notify import Change
from tokensvc.token import DEFAULT_MIN_VALID_FOR, Clock, ServerToken, Token, utcnow
from tokensvc.watch import Watch

log = logging.getLogger(__name__)

Fetch = Callable[[ServerSpec, Credential], Awaitable[Token]]

# A refresh that keeps meeting a newer registration gives up after this many
# rounds rather than loop while an admin (or a reconciler gone wrong) edits.
MAX_ROUNDS = 3
# A discovered token endpoint that stops answering is looked up again at most this often.
REDISCOVER_INTERVAL = timedelta(minutes=5)
# A scheduled refresh that could not reach the database is tried again after this.
STORE_RETRY = timedelta(seconds=2)


@dataclass(frozen=True, slots=True)
class _Flight:
    task: asyncio.Task[ServerToken]
    # The token version this refresh was started to replace (0: none).
    replaces: int


@dataclass(frozen=True, slots=True)
class _Failing:
    """Consecutive failures of a server, and until when a permanent one stands."""

    count: int
    event: FetchFailed


class TokenManager:
    def __init__(
        self,
        store: Store,
        fetch: Fetch,
        *,
        clock: Clock = utcnow,
        min_valid_for: timedelta = DEFAULT_MIN_VALID_FOR,
        policy: RefreshPolicy | None = None,
        bus: EventBus | None = None,
        rng: random.Random | None = None,
        discover: Callable[[ServerSpec], Awaitable[Discovery]] | None = None,
        min_forced_refresh_interval: timedelta = timedelta(seconds=10),
    ) -> None:
        self._store = store
        self._fetch = metrics.timed_fetch(fetch)
        self._clock = clock
        self.min_valid_for = min_valid_for
        self.policy = policy or RefreshPolicy()
        self.bus = bus or EventBus()
        self._rng = rng or random.Random()
        self._discover = discover
        self.min_forced_refresh_interval = min_forced_refresh_interval
        # When each server's token was last replaced because it was reported
        # rejected (here, or as another replica stored it).
        self._forced_at: dict[str, datetime] = {}
        self.scheduler = Scheduler(self._scheduled_refresh, clock)
        self._cache: dict[str, ServerToken] = {}
        self._flights: dict[str, _Flight] = {}
        self._failing: dict[str, _Failing] = {}
        # The registered servers this process knows of, with their refresh fraction.
        self._known: dict[str, float] = {}
        # Bumped whenever a server's registration changes or it is deleted: a
        # refresh that saw another epoch must not publish what it fetched.
        self._epochs: dict[str, int] = {}

    # lifecycle ---------------------------------------------------------------

    async def start(self, run_scheduler: bool = True) -> None:
        """Loads every stored token that is still valid and schedules each
        server's next refresh (now, for servers without a usable token)."""
        now = self._clock()
        for record, stored in await self._store.load_all():
            server_id = record.spec.id
            self._known[server_id] = record.spec.refresh_fraction
            if stored is not None and stored.token.expires_at > now:
                self._cache[server_id] = stored
                metrics.token_held(server_id, stored.token)
                self.scheduler.schedule(server_id, self._refresh_at(server_id, stored.token))
            else:
                self.scheduler.schedule(server_id, now)
        if run_scheduler:
            self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        flights = [flight.task for flight in self._flights.values()]
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)

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
        replaces = 0
        if cached is not None:
            rejected = bool(rejected_sha256) and cached.token.sha256 == rejected_sha256.lower()
            if rejected and self._forced_recently(server_id) and self._fresh_enough(cached, wanted):
                metrics.rejected_token_report(server_id, "rate_limited")
                return cached  # one forced refresh per interval, however many report
            if rejected_sha256:
                metrics.rejected_token_report(server_id, "refreshed" if rejected else "stale")
            if not rejected and self._fresh_enough(cached, wanted):
                return cached
            replaces = cached.version if rejected else 0
        failing = self._failing.get(server_id)
        if (
            failing is not None
            and failing.event.permanent
            and failing.event.next_attempt is not None
            and self._clock() < failing.event.next_attempt
        ):
            # A refused credential is not retried on every call: brokers get
            # the refusal until the backoff ends or an admin changes it.
            raise failing.event.error.with_traceback(None)
        return await self._join_refresh(server_id, replaces, wanted, rejected_sha256)

    def _forced_recently(self, server_id: str) -> bool:
        """A rejected token was replaced less than the interval ago: a broker
        (or an MCP server) that keeps refusing tokens must not turn tokensvc
        into a flood of token requests against the authorization server."""
        forced = self._forced_at.get(server_id)
        return forced is not None and self._clock() - forced < self.min_forced_refresh_interval

    def _fresh_enough(self, held: ServerToken, wanted: timedelta) -> bool:
        return held.token.fresh_enough(wanted, self._clock())

    async def _join_refresh(
        self, server_id: str, replaces: int, wanted: timedelta, rejected_sha256: str = ""
    ) -> ServerToken:
        flight = self._flights.get(server_id)
        if flight is None or flight.replaces < replaces:
            # A refresh running for an older reason may bring back the very
            # token being replaced; chain a new one behind it instead.
            previous = flight.task if flight is not None else None
            task = asyncio.create_task(
                self._refresh(server_id, replaces, wanted, rejected_sha256, previous),
                name=f"refresh:{server_id}",
            )
            flight = _Flight(task, replaces)
            self._flights[server_id] = flight
            task.add_done_callback(functools.partial(self._flight_done, server_id))
        # shield: a caller that gives up must not cancel the refresh the others wait for.
        metrics.waiter_joined()
        try:
            return await asyncio.shield(flight.task)
        finally:
            metrics.waiter_left()

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
        try:
            for _ in range(MAX_ROUNDS):
                # Across replicas, one at a time per server; a replica that
                # waited here finds the token the other one stored, and takes it.
                async with self._store.refresh_lock(server_id):
                    held = await self._round(server_id, replaces, wanted, rejected_sha256)
                if held is not None:
                    return held
        except StoreUnavailable:
            fallback = self._cache.get(server_id)
            if fallback is not None and fallback.token.expires_at > self._clock():
                return fallback  # the database is down: serve from memory while valid
            raise
        raise RegistrationChanged(server_id)

    async def _round(
        self, server_id: str, replaces: int, wanted: timedelta, rejected_sha256: str
    ) -> ServerToken | None:
        """One attempt: the stored token if it will do, else a fetched one.
        None: the registration changed meanwhile; try again."""
        epoch = self._epochs.get(server_id, 0)
        context = await self._store.load_for_fetch(server_id)
        stored, record = context.token, context.record
        self._known[server_id] = record.spec.refresh_fraction
        if record.status.forced_refresh_time is not None:
            self._forced_at[server_id] = record.status.forced_refresh_time
        rejected = bool(rejected_sha256)
        if stored is not None and self._fresh_enough(stored, wanted):
            reported = rejected and stored.token.sha256 == rejected_sha256.lower()
            replaced = stored.version > replaces and not reported
            # Another replica may have forced a refresh within the interval.
            if replaced or (rejected and self._forced_recently(server_id)):
                self._adopt(server_id, epoch, stored)
                return stored
        try:
            token, used = await self._fetch_for(context)
        except FetchError as exc:
            await self._failed(server_id, epoch, record, exc)
            fallback = self._cache.get(server_id)
            if (
                fallback is not None
                and fallback.version > replaces
                and fallback.token.expires_at > self._clock()
            ):
                return fallback  # outage: the token still valid is served until it expires
            raise
        next_refresh = self._refresh_at(server_id, token)
        saved = await self._store.save_token(
            server_id, record.incarnation, record.revision, token, next_refresh, used, rejected
        )
        if saved is not None and rejected:
            self._forced_at[server_id] = token.issued_at
        if saved is None or self._epochs.get(server_id, 0) != epoch:
            log.info(
                "fetched token discarded: the registration changed meanwhile",
                extra={"server_id": server_id, "revision": record.revision},
            )
            return None
        log.info(
            "token fetched",
            extra={
                "server_id": server_id,
                "version": saved.version,
                "expires_at": saved.token.expires_at.isoformat(),
                "next_refresh": next_refresh.isoformat(),
            },
        )
        self._adopt(server_id, epoch, saved)
        return saved

    async def _fetch_for(self, context: FetchContext) -> tuple[Token, str]:
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

    def _adopt(self, server_id: str, epoch: int, held: ServerToken) -> None:
        """Makes ``held`` the current token, schedules its replacement and tells
        watchers; unless the registration changed meanwhile, or it is older."""
        if self._epochs.get(server_id, 0) != epoch:
            return
        current = self._cache.get(server_id)
        if current is not None and held.version < current.version:
            return
        self._cache[server_id] = held
        metrics.token_held(server_id, held.token)
        self._failing.pop(server_id, None)
        self.scheduler.schedule(server_id, self._refresh_at(server_id, held.token))
        if current is None or held.version > current.version:
            metrics.token_rotated(server_id)
            self.bus.publish(TokenIssued(held))

    def _refresh_at(self, server_id: str, token: Token) -> datetime:
        # The same for a given token in every replica (and after a restart):
        # the jitter is seeded by the token, so the fleet wakes together and
        # one of them refreshes while the others wait for it at the lock.
        return self.policy.refresh_at(
            token.issued_at,
            token.expires_at,
            random.Random(token.sha256),
            self._known.get(server_id, 0.0),
        )

    async def _failed(
        self, server_id: str, epoch: int, record: ServerRecord, error: FetchError
    ) -> None:
        now = self._clock()
        previous = self._failing.get(server_id)
        count = previous.count + 1 if previous is not None else 1
        next_attempt = now + self.policy.retry_in(error, count, self._rng)
        held = self._cache.get(server_id)
        current_expiry = held.token.expires_at if held and held.token.expires_at > now else None
        event = FetchFailed(
            server_id=server_id,
            error=error,
            time=now,
            next_attempt=next_attempt,
            current_expires_at=current_expiry,
            permanent=not isinstance(error, TransientFetchError),
        )
        log.warning(
            "token request failed",
            extra={
                "server_id": server_id,
                "reason": error.reason,
                "error": error.oauth.error,
                "failures": count,
                "next_attempt": next_attempt.isoformat(),
            },
        )
        try:
            await self._store.record_failure(
                server_id, record.incarnation, record.revision, error, next_attempt
            )
        except StoreUnavailable:
            log.warning("could not record the failure", extra={"server_id": server_id})
        if self._epochs.get(server_id, 0) != epoch:
            return
        self._failing[server_id] = _Failing(count, event)
        self.scheduler.schedule(server_id, next_attempt)
        self.bus.publish(event)

    async def _scheduled_refresh(self, server_id: str) -> None:
        due = self.scheduler.due_at(server_id)
        if due is not None and due > self._clock():
            return  # rescheduled while this run waited for a slot: a caller refreshed it
        held = self._cache.get(server_id)
        try:
            await self._join_refresh(server_id, held.version if held else 0, self.min_valid_for)
        finally:
            if self.scheduler.due_at(server_id) is None and server_id in self._known:
                # Neither a new token nor a failure of the authorization server
                # scheduled the next run: the database was out. Try again soon.
                self.scheduler.schedule(server_id, self._clock() + STORE_RETRY)

    # registration changes -------------------------------------------------

    def registered(self, record: ServerRecord, revised: bool) -> None:
        """An admin created or changed the server. A new revision voids the
        held token: watchers are told, and a new one is fetched at once."""
        server_id = record.spec.id
        self._known[server_id] = record.spec.refresh_fraction
        if revised:
            had_token = server_id in self._cache
            self._invalidate(server_id)
            self._failing.pop(server_id, None)
            if had_token or record.revision > 1:
                self.bus.publish(TokenRevoked(server_id, record.revision))
            self.scheduler.schedule(server_id, self._clock())
        elif (held := self._cache.get(server_id)) is not None:
            self.scheduler.schedule(server_id, self._refresh_at(server_id, held.token))

    def removed(self, server_id: str) -> None:
        self._invalidate(server_id)
        self._failing.pop(server_id, None)
        self._known.pop(server_id, None)
        self.scheduler.cancel(server_id)
        self.bus.publish(ServerRemoved(server_id))

    # other replicas ----------------------------------------------------------

    async def apply(self, change: Change) -> None:
        """Another replica changed a server: read the row (a notification never
        carries a token) and bring this process and its watchers up to date."""
        server_id = change.server_id
        if change.kind == "removed":
            if server_id in self._known:
                self.removed(server_id)
        elif change.kind == "registered":
            self.registered(await self._store.get_server(server_id), change.revised)
        elif change.kind == "token":
            epoch = self._epochs.get(server_id, 0)  # before the read: a change meanwhile wins
            held = await self._store.load_token(server_id)
            if held is not None:
                self._adopt(server_id, epoch, held)
        elif change.kind == "failed":
            await self._failed_elsewhere(await self._store.get_server(server_id))

    async def _failed_elsewhere(self, record: ServerRecord) -> None:
        server_id, status = record.spec.id, record.status
        if status.last_error is None:
            return
        error = error_of(status.last_error)
        held = self._cache.get(server_id)
        now = self._clock()
        event = FetchFailed(
            server_id=server_id,
            error=error,
            time=status.last_error.time,
            next_attempt=status.next_refresh_time,
            current_expires_at=held.token.expires_at
            if held and held.token.expires_at > now
            else None,
            permanent=not isinstance(error, TransientFetchError),
        )
        previous = self._failing.get(server_id)
        self._failing[server_id] = _Failing(previous.count + 1 if previous else 1, event)
        if status.next_refresh_time is not None:
            self.scheduler.schedule(server_id, status.next_refresh_time)
        self.bus.publish(event)

    async def resync(self) -> None:
        """Catches up with everything the database says, after a time in which
        notifications may have been lost (a listener reconnection)."""
        now = self._clock()
        seen = set()
        epochs = dict(self._epochs)  # before the read: a change meanwhile wins
        for record, stored in await self._store.load_all():
            server_id = record.spec.id
            seen.add(server_id)
            held = self._cache.get(server_id)
            if held is not None and held.revision != record.revision:
                self.registered(record, revised=True)  # changed while we were not told
            elif server_id not in self._known:
                self._known[server_id] = record.spec.refresh_fraction
                self.scheduler.schedule(server_id, now)  # new to us; the stored token may do
            if stored is not None and stored.token.expires_at > now:
                self._adopt(server_id, epochs.get(server_id, 0), stored)
            if self.scheduler.due_at(server_id) is None and server_id not in self._flights:
                self.scheduler.schedule(server_id, now)  # lost its schedule in an outage
        for server_id in set(self._known) - seen:
            self.removed(server_id)

    def _invalidate(self, server_id: str) -> None:
        self._epochs[server_id] = self._epochs.get(server_id, 0) + 1
        self._cache.pop(server_id, None)
        metrics.server_forgotten(server_id)

    # watching -------------------------------------------------------------

    def watch(
        self,
        server_ids: Collection[str] | None = None,
        allow: Callable[[str], bool] | None = None,
        owner: str = "",
    ) -> Watch:
        """The token changes of ``server_ids`` (None: all) that ``allow`` lets
        through, by the watch protocol (tokensvc.watch)."""
        return Watch(self.bus, self.snapshot, server_ids, allow, owner)

    def end_watches(self, owner: str) -> None:
        """Ends the watches of one caller (revoked)."""
        self.bus.close_owner(owner)

    def watch_owners(self) -> set[str]:
        return self.bus.owners()

    def close_watches(self) -> None:
        """Ends every watch (on shutdown: watchers reconnect elsewhere)."""
        self.bus.close()

    def snapshot(self, server_ids: Collection[str] | None) -> list[Event]:
        """The current state as events, for the start of a watch stream."""
        now = self._clock()
        known = set(self._known)
        events: list[Event] = []
        for server_id in sorted(server_ids if server_ids else known):
            held = self._cache.get(server_id)
            failing = self._failing.get(server_id)
            if held is not None and held.token.expires_at > now:
                events.append(TokenIssued(held))
            elif failing is not None:
                events.append(failing.event)
            elif server_id not in known:
                events.append(ServerRemoved(server_id))
        return events

    def cached(self, server_id: str) -> ServerToken | None:
        return self._cache.get(server_id)


def error_of(last: LastError) -> FetchError:
    """A recorded failure as the error it was (for watchers on other replicas)."""
    kinds: dict[str, type[FetchError]] = {
        cls.reason: cls
        for cls in (
            CredentialsRejected,
            TokenRequestRejected,
            AuthorizationServerUnavailable,
            InvalidTokenResponse,
            CredentialUnavailable,
        )
    }
    cls = kinds.get(last.reason, AuthorizationServerUnavailable)
    return cls(
        last.error_description or last.reason, OAuthErrorFields(last.error, last.error_description)
    )
