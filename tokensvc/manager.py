"""TokenManager: the policy. Cache, single flight, schedule, backoff, events.

It reads like the spec: serve the cached token if it is valid long enough;
otherwise join the one refresh in flight for that server, or start it. A
refresh first looks at the store (a token saved before a restart, or by
another process, is taken instead of fetched), then asks the authorization
server and saves the result under the revision it was fetched for. Every
token is replaced ahead of expiry by one scheduler for all servers; failures
back off (see policy.py) and are never served as tokens; a token still valid
is served through an outage, never after its expiry.

What it holds per server is in tokensvc.held, a token request's fallbacks in
tokensvc.fallbacks, what other replicas did reaches it through
tokensvc.replication, and which replica refreshes which server is
tokensvc.ownership's to say.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime, timedelta

from tokensvc import metrics
from tokensvc.discovery import Discovery
from tokensvc.errors import (
    FetchError,
    RegistrationChanged,
    StoreUnavailable,
)
from tokensvc.events import (
    Event,
    EventBus,
    FetchFailed,
    ServerRemoved,
    TokenIssued,
    TokenRevoked,
)
from tokensvc.fallbacks import Fallbacks, Fetch
from tokensvc.held import Failing, Servers, ServerState
from tokensvc.ownership import Duty, Membership
from tokensvc.policy import RefreshPolicy
from tokensvc.registration import ServerSpec
from tokensvc.replication import Replication
from tokensvc.scheduler import Scheduler
from tokensvc.store import ServerRecord, Store
from tokensvc.token import DEFAULT_MIN_VALID_FOR, Clock, ServerToken, Token, utcnow
from tokensvc.watch import Watches

log = logging.getLogger(__name__)


# A refresh that keeps meeting a newer registration gives up after this many
# rounds rather than loop while an admin (or a reconciler gone wrong) edits.
MAX_ROUNDS = 3
# A scheduled refresh that could not reach the database is tried again after this.
STORE_RETRY = timedelta(seconds=2)


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
        membership: Membership | None = None,
        takeover: timedelta = timedelta(0),
        fetch_concurrency: int = 32,
    ) -> None:
        self._store = store
        self._fetcher = Fallbacks(store, metrics.timed_fetch(fetch), discover, clock)
        self._clock = clock
        self.min_valid_for = min_valid_for
        self.policy = policy or RefreshPolicy()
        self.bus = bus or EventBus()
        self._rng = rng or random.Random()
        self.min_forced_refresh_interval = min_forced_refresh_interval
        self.scheduler = Scheduler(self._scheduled_refresh, clock, concurrency=fetch_concurrency)
        self.servers = Servers()
        self.replication = Replication(self, store, clock)
        # Alone (SQLite, tests): this process owns every server.
        self.duty = Duty(membership or Membership(""), self.policy, takeover)
        self.watches = Watches(self.bus, self.snapshot)

    # lifecycle ---------------------------------------------------------------

    async def start(self, run_scheduler: bool = True) -> None:
        """Loads every stored token that is still valid and schedules each
        server's next refresh (now, for servers without a usable token)."""
        now = self._clock()
        for record, stored in await self._store.load_all():
            server_id = record.spec.id
            state = self.servers.know(record)
            if stored is not None and stored.token.expires_at > now:
                state.token = stored
                metrics.token_held(server_id, stored.token)
            self.schedule_refresh(server_id)
        if run_scheduler:
            self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.servers.cancel_flights()

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
        state = self.servers.get(server_id)
        cached = state.token
        replaces = 0
        if cached is not None:
            rejected = bool(rejected_sha256) and cached.token.sha256 == rejected_sha256.lower()
            if rejected and self._forced_recently(state) and self._fresh_enough(cached, wanted):
                metrics.rejected_token_report(server_id, "rate_limited")
                return cached  # one forced refresh per interval, however many report
            if rejected_sha256:
                metrics.rejected_token_report(server_id, "refreshed" if rejected else "stale")
            if not rejected and self._fresh_enough(cached, wanted):
                return cached
            replaces = cached.version if rejected else 0
        if state.failing is not None and state.failing.blocks(self._clock()):
            # A refused credential is not retried on every call: brokers get
            # the refusal until the backoff ends or an admin changes it.
            raise state.failing.event.error.with_traceback(None)
        return await self._join_refresh(server_id, replaces, wanted, rejected_sha256)

    def _forced_recently(self, state: ServerState) -> bool:
        """A rejected token was replaced less than the interval ago: a broker
        (or an MCP server) that keeps refusing tokens must not turn tokensvc
        into a flood of token requests against the authorization server."""
        return state.forced_within(self._clock(), self.min_forced_refresh_interval)

    def _fresh_enough(self, held: ServerToken, wanted: timedelta) -> bool:
        return held.token.fresh_enough(wanted, self._clock())

    async def _join_refresh(
        self, server_id: str, replaces: int, wanted: timedelta, rejected_sha256: str = ""
    ) -> ServerToken:
        task = self.servers.flight(
            server_id,
            replaces,
            lambda previous: self._refresh(server_id, replaces, wanted, rejected_sha256, previous),
        )
        # shield: a caller that gives up must not cancel the refresh the others wait for.
        metrics.waiter_joined()
        try:
            return await asyncio.shield(task)
        finally:
            metrics.waiter_left()

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
            held = self.servers.get(server_id).token
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
            fallback = self.servers.get(server_id).valid_token(self._clock())
            if fallback is not None:
                return fallback  # the database is down: serve from memory while valid
            raise
        raise RegistrationChanged(server_id)

    async def _round(
        self, server_id: str, replaces: int, wanted: timedelta, rejected_sha256: str
    ) -> ServerToken | None:
        """One attempt: the stored token if it will do, else a fetched one.
        None: the registration changed meanwhile; try again."""
        epoch = self.servers.get(server_id).epoch
        context = await self._store.load_for_fetch(server_id)
        stored, record = context.token, context.record
        state = self.servers.know(record)
        if record.status.forced_refresh_time is not None:
            state.forced_at = record.status.forced_refresh_time
        rejected = bool(rejected_sha256)
        if stored is not None and self._fresh_enough(stored, wanted):
            reported = rejected and stored.token.sha256 == rejected_sha256.lower()
            replaced = stored.version > replaces and not reported
            # Another replica may have forced a refresh within the interval.
            if replaced or (rejected and self._forced_recently(state)):
                self.adopt(server_id, epoch, stored)
                return stored
        try:
            token, used = await self._fetcher.fetch_for(context)
        except FetchError as exc:
            await self._failed(server_id, epoch, record, exc)
            fallback = self.servers.get(server_id).valid_token(self._clock())
            if fallback is not None and fallback.version > replaces:
                return fallback  # outage: the token still valid is served until it expires
            raise
        next_refresh = self._refresh_at(server_id, token)
        saved = await self._store.save_token(
            server_id, record.incarnation, record.revision, token, next_refresh, used, rejected
        )
        if saved is not None and rejected:
            self.servers.state(server_id).forced_at = token.issued_at
        if saved is None or self.servers.get(server_id).epoch != epoch:
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
        self.adopt(server_id, epoch, saved)
        return saved

    def adopt(self, server_id: str, epoch: int, held: ServerToken) -> None:
        """Makes ``held`` the current token, schedules its replacement and tells
        watchers; unless the registration changed meanwhile, or it is older."""
        state = self.servers.state(server_id)
        if state.epoch != epoch:
            return
        current = state.token
        if current is not None and held.version < current.version:
            return
        state.token, state.failing = held, None
        metrics.token_held(server_id, held.token)
        self.schedule_refresh(server_id)
        if current is None or held.version > current.version:
            metrics.token_rotated(server_id)
            self.bus.publish(TokenIssued(held))

    def _refresh_at(self, server_id: str, token: Token) -> datetime:
        return self.policy.replace_at(token, self.servers.get(server_id).refresh_fraction)

    def schedule_refresh(self, server_id: str) -> None:
        """Schedules the server's next refresh here: when its token is due if
        this replica owns it, at a fallback time if another does."""
        state = self.servers.get(server_id)
        due = self.duty.due(server_id, state, self._clock())
        # A retry after a failure keeps its time: it may be the server's Retry-After.
        self.scheduler.schedule(server_id, due, early=state.failing is None)

    async def _failed(
        self, server_id: str, epoch: int, record: ServerRecord, error: FetchError
    ) -> None:
        now = self._clock()
        state = self.servers.state(server_id)
        count = state.failures + 1
        next_attempt = now + self.policy.retry_in(error, count, self._rng)
        event = state.failure(server_id, error, now, next_attempt, now)
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
        if state.epoch != epoch:
            return
        self.failed(server_id, event, count)

    def failed(self, server_id: str, event: FetchFailed, count: int) -> None:
        """The ``count``th failure in a row stands until its next attempt."""
        self.servers.state(server_id).failing = Failing(count, event)
        if event.next_attempt is not None:
            self.schedule_refresh(server_id)
        self.bus.publish(event)

    async def _scheduled_refresh(self, server_id: str) -> None:
        due = self.scheduler.due_at(server_id)
        if due is not None and due > self._clock():
            return  # rescheduled while this run waited for a slot: a caller refreshed it
        held = self.servers.get(server_id).token
        try:
            await self._join_refresh(server_id, held.version if held else 0, self.min_valid_for)
        finally:
            if self.scheduler.due_at(server_id) is None and self.servers.get(server_id).registered:
                # Neither a new token nor a failure of the authorization server
                # scheduled the next run: the database was out. Try again soon.
                self.scheduler.schedule(server_id, self._clock() + STORE_RETRY)

    # registration changes -------------------------------------------------

    def registered(self, record: ServerRecord, revised: bool) -> None:
        """An admin created or changed the server. A new revision voids the
        held token: watchers are told, and a new one is fetched at once."""
        server_id = record.spec.id
        state = self.servers.know(record)
        if revised:
            had_token = state.token is not None
            state.invalidate()
            metrics.server_forgotten(server_id)
            if had_token or record.revision > 1:
                self.bus.publish(TokenRevoked(server_id, record.revision))
            self.schedule_refresh(server_id)
        elif state.token is not None:
            self.schedule_refresh(server_id)

    def removed(self, server_id: str) -> None:
        state = self.servers.state(server_id)
        state.invalidate()
        metrics.server_forgotten(server_id)
        state.registered, state.refresh_fraction = False, 0.0
        self.scheduler.cancel(server_id)
        self.bus.publish(ServerRemoved(server_id))

    # watching -------------------------------------------------------------

    def snapshot(self, server_ids: Collection[str] | None) -> list[Event]:
        """The current state as events, for the start of a watch stream."""
        return self.servers.snapshot(server_ids, self._clock())

    def cached(self, server_id: str) -> ServerToken | None:
        return self.servers.get(server_id).token
