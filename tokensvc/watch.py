"""The watch protocol: what every stream of token changes sees, whatever carries it.

A watch subscribes to the manager's changes *before* it takes the snapshot of
the current state, so that no change can fall between the two. It then gives:

1. the snapshot, one event per server;
2. :class:`Synced`, once: the watcher now holds the whole current state;
3. the changes, coalesced to the newest per server while the watcher is busy,
   with a token version never given twice (one already in the snapshot is
   dropped when its change arrives).

If the watcher's caller is revoked, the watch ends with :class:`CallerRevoked`.
Every item carries a sequence number, 1, 2, 3, ... on that watch. WatchTokens
(gRPC) and the Envoy SDS channel are its consumers; neither reaches the bus.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass

from tokensvc.events import Event, EventBus, TokenIssued

MAX_WATCHED = 1000  # server ids one watch (or SDS stream) may name


@dataclass(frozen=True, slots=True)
class Synced:
    """The watcher has been given the whole current state."""


@dataclass(frozen=True, slots=True)
class CallerRevoked:
    """The watcher's caller was revoked: the last item of its watch."""


@dataclass(frozen=True, slots=True)
class Update:
    sequence: int
    event: Event | Synced | CallerRevoked


Snapshot = Callable[[Collection[str] | None], list[Event]]


class Watch:
    """One watcher's view of the token changes of ``server_ids`` (None: all)
    that ``allow`` lets it see. Iterate it once; ``owner`` (a caller id) lets
    the streams of a revoked caller be ended."""

    def __init__(
        self,
        bus: EventBus,
        snapshot: Snapshot,
        server_ids: Collection[str] | None = None,
        allow: Callable[[str], bool] | None = None,
        owner: str = "",
    ) -> None:
        self._bus = bus
        self._snapshot = snapshot
        self._server_ids = list(dict.fromkeys(server_ids)) if server_ids else None
        self._allow = allow
        self._owner = owner

    def _visible(self, server_id: str) -> bool:
        return self._allow is None or self._allow(server_id)

    async def __aiter__(self) -> AsyncGenerator[Update, None]:
        subscription = self._bus.subscribe(self._server_ids, self._allow, self._owner)
        sent: dict[str, int] = {}  # the newest token version given, per server
        sequence = 0
        try:
            for event in self._snapshot(self._server_ids):
                if not self._visible(event.server_id):
                    continue
                if isinstance(event, TokenIssued):
                    sent[event.server_id] = event.token.version
                sequence += 1
                yield Update(sequence, event)
            sequence += 1
            yield Update(sequence, Synced())
            while batch := await subscription.next_batch():
                for event in batch:
                    if isinstance(event, TokenIssued):
                        if event.token.version <= sent.get(event.server_id, 0):
                            continue  # already given
                        sent[event.server_id] = event.token.version
                    else:
                        sent.pop(event.server_id, None)
                    sequence += 1
                    yield Update(sequence, event)
            if subscription.revoked:
                yield Update(sequence + 1, CallerRevoked())
        finally:
            self._bus.unsubscribe(subscription)


class Watches:
    """The watches of one token manager: opened over its bus and its snapshot."""

    def __init__(self, bus: EventBus, snapshot: Snapshot) -> None:
        self._bus = bus
        self._snapshot = snapshot

    def open(
        self,
        server_ids: Collection[str] | None = None,
        allow: Callable[[str], bool] | None = None,
        owner: str = "",
    ) -> Watch:
        """The token changes of ``server_ids`` (None: all) that ``allow`` lets through."""
        return Watch(self._bus, self._snapshot, server_ids, allow, owner)

    def end(self, owner: str) -> None:
        """Ends the watches of one caller (revoked)."""
        self._bus.close_owner(owner)

    def owners(self) -> set[str]:
        return self._bus.owners()

    def close(self) -> None:
        """Ends every watch (on shutdown: watchers reconnect elsewhere)."""
        self._bus.close()
