"""EventBus: fans every token change out to the WatchTokens streams.

The stream is state, not a log: a subscriber keeps only the newest pending
event per server, so one that reads slowly (or not at all) costs memory
bounded by the number of servers and never delays the publisher or the other
subscribers. ``publish`` never awaits; writing to the network happens in each
stream's own task, outside any lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from tokensvc import metrics
from tokensvc.errors import FetchError
from tokensvc.token import ServerToken


@dataclass(frozen=True, slots=True)
class TokenIssued:
    token: ServerToken

    @property
    def server_id(self) -> str:
        return self.token.server_id


@dataclass(frozen=True, slots=True)
class FetchFailed:
    server_id: str
    error: FetchError
    time: datetime
    next_attempt: datetime | None
    current_expires_at: datetime | None
    permanent: bool


@dataclass(frozen=True, slots=True)
class TokenRevoked:
    server_id: str
    revision: int


@dataclass(frozen=True, slots=True)
class ServerRemoved:
    server_id: str


Event = TokenIssued | FetchFailed | TokenRevoked | ServerRemoved


class Subscription:
    """One stream's pending events, newest per server, in arrival order.
    ``allow`` filters what its caller may see; ``owner`` is the caller's id."""

    def __init__(
        self,
        server_ids: Collection[str] | None,
        allow: Callable[[str], bool] | None = None,
        owner: str = "",
    ) -> None:
        self.server_ids = frozenset(server_ids) if server_ids else None
        self.allow = allow
        self.owner = owner
        self._pending: dict[str, Event] = {}
        self._ready = asyncio.Event()
        self.closed = False
        self.revoked = False  # closed because its owner was revoked

    def wants(self, server_id: str) -> bool:
        if self.allow is not None and not self.allow(server_id):
            return False
        return self.server_ids is None or server_id in self.server_ids

    def offer(self, event: Event) -> None:
        # Re-inserting moves the server to the end: events leave in the order
        # of their latest change.
        if self._pending.pop(event.server_id, None) is not None:
            metrics.watch_event_coalesced()
        self._pending[event.server_id] = event
        self._ready.set()

    def close(self, revoked: bool = False) -> None:
        self.closed = True
        self.revoked = self.revoked or revoked
        self._ready.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def next_batch(self) -> list[Event]:
        """Waits for events and takes them all; an empty list means closed."""
        while not self._pending and not self.closed:
            self._ready.clear()
            await self._ready.wait()
        batch = list(self._pending.values())
        self._pending.clear()
        return [] if self.closed else batch


class EventBus:
    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self.closed = False

    def subscribe(
        self,
        server_ids: Collection[str] | None = None,
        allow: Callable[[str], bool] | None = None,
        owner: str = "",
    ) -> Subscription:
        subscription = Subscription(server_ids, allow, owner)
        if self.closed:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
            metrics.watch_stream_opened()
        return subscription

    def unsubscribe(self, subscription: Subscription, revoked: bool = False) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.discard(subscription)
            metrics.watch_streams_closed()
        subscription.close(revoked)

    def publish(self, event: Event) -> None:
        for subscription in tuple(self._subscriptions):
            if subscription.wants(event.server_id):
                subscription.offer(event)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def owners(self) -> set[str]:
        return {s.owner for s in self._subscriptions if s.owner}

    def close_owner(self, owner: str) -> None:
        """Ends the streams of one caller (revoked)."""
        for subscription in tuple(self._subscriptions):
            if subscription.owner == owner:
                self.unsubscribe(subscription, revoked=True)

    def close(self) -> None:
        """Ends every stream (on shutdown: clients reconnect elsewhere)."""
        self.closed = True
        for subscription in tuple(self._subscriptions):
            subscription.close()
        metrics.watch_streams_closed(len(self._subscriptions))
        self._subscriptions.clear()
