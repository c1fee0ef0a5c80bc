"""What the token manager holds per server: its token, the refresh in flight,
its failures, its epoch; and the table of them all."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from tokensvc.errors import FetchError, TransientFetchError
from tokensvc.events import Event, FetchFailed, ServerRemoved, TokenIssued
from tokensvc.store import ServerRecord
from tokensvc.token import ServerToken


@dataclass(frozen=True, slots=True)
class Flight:
    task: asyncio.Task[ServerToken]
    # The token version this refresh was started to replace (0: none).
    replaces: int


@dataclass(frozen=True, slots=True)
class Failing:
    """Consecutive failures of a server, and until when a permanent one stands."""

    count: int
    event: FetchFailed

    def blocks(self, now: datetime) -> bool:
        """A permanent failure stands until its next attempt."""
        until = self.event.next_attempt
        return self.event.permanent and until is not None and now < until


@dataclass(slots=True)
class ServerState:
    """What this process holds for one server."""

    registered: bool = False  # a registered server this process knows of
    refresh_fraction: float = 0.0
    token: ServerToken | None = None
    flight: Flight | None = None
    failing: Failing | None = None
    # Bumped whenever the registration changes or the server is deleted: a
    # refresh that saw another epoch must not publish what it fetched.
    epoch: int = 0
    # When the token was last replaced because it was reported rejected (here,
    # or as another replica stored it).
    forced_at: datetime | None = None

    @property
    def idle(self) -> bool:
        """Nothing worth keeping: an unknown id that a caller asked for."""
        parts = (self.flight, self.token, self.failing, self.forced_at)
        return not self.registered and self.epoch == 0 and all(p is None for p in parts)

    @property
    def failures(self) -> int:
        return self.failing.count if self.failing is not None else 0

    def invalidate(self) -> None:
        """The registration changed or went: what is held is void."""
        self.epoch += 1
        self.token = self.failing = None

    def forced_within(self, now: datetime, interval: timedelta) -> bool:
        """The token was replaced as rejected less than ``interval`` ago."""
        return self.forced_at is not None and now - self.forced_at < interval

    def valid_token(self, now: datetime) -> ServerToken | None:
        """The token held, if it has not expired."""
        held = self.token
        return held if held is not None and held.token.expires_at > now else None

    def failure(
        self,
        server_id: str,
        error: FetchError,
        time: datetime,
        next_attempt: datetime | None,
        now: datetime,
    ) -> FetchFailed:
        """The event that tells watchers of a failure (here or on another replica)."""
        held = self.valid_token(now)
        return FetchFailed(
            server_id=server_id,
            error=error,
            time=time,
            next_attempt=next_attempt,
            current_expires_at=held.token.expires_at if held is not None else None,
            permanent=not isinstance(error, TransientFetchError),
        )


class Servers:
    """The state of every server this process has heard of."""

    def __init__(self) -> None:
        self._states: dict[str, ServerState] = {}

    def state(self, server_id: str) -> ServerState:
        """The server's state, created on first use."""
        state = self._states.get(server_id)
        if state is None:
            state = self._states[server_id] = ServerState()
        return state

    def get(self, server_id: str) -> ServerState:
        """The server's state, or an empty one (not kept)."""
        return self._states.get(server_id) or ServerState()

    def know(self, record: ServerRecord) -> ServerState:
        state = self.state(record.spec.id)
        state.registered, state.refresh_fraction = True, record.spec.refresh_fraction
        return state

    def flight(
        self,
        server_id: str,
        replaces: int,
        refresh: Callable[[asyncio.Task[ServerToken] | None], Coroutine[Any, Any, ServerToken]],
    ) -> asyncio.Task[ServerToken]:
        """The one refresh in flight for the server, started if there is none
        (single flight). ``refresh`` gets the task it must wait for, if any."""
        state = self.state(server_id)
        flight = state.flight
        if flight is None or flight.replaces < replaces:
            # A refresh running for an older reason may bring back the very
            # token being replaced; chain a new one behind it instead.
            previous = flight.task if flight is not None else None
            task = asyncio.create_task(refresh(previous), name=f"refresh:{server_id}")
            flight = state.flight = Flight(task, replaces)
            task.add_done_callback(functools.partial(self._landed, server_id))
        return flight.task

    def _landed(self, server_id: str, task: asyncio.Task[ServerToken]) -> None:
        state = self._states.get(server_id)
        if state is not None and state.flight is not None and state.flight.task is task:
            state.flight = None
            if state.idle:
                del self._states[server_id]
        if not task.cancelled():
            task.exception()  # retrieved here so an unawaited failure is not logged as lost

    def known(self) -> set[str]:
        """The registered servers this process knows of."""
        return {sid for sid, state in self._states.items() if state.registered}

    def epochs(self) -> dict[str, int]:
        return {server_id: state.epoch for server_id, state in self._states.items()}

    async def cancel_flights(self) -> None:
        flights = [s.flight.task for s in self._states.values() if s.flight is not None]
        for task in flights:
            task.cancel()
        await asyncio.gather(*flights, return_exceptions=True)

    def snapshot(self, server_ids: Collection[str] | None, now: datetime) -> list[Event]:
        """The current state as events, for the start of a watch stream."""
        known = self.known()
        events: list[Event] = []
        for server_id in sorted(server_ids if server_ids else known):
            state = self.get(server_id)
            held = state.valid_token(now)
            if held is not None:
                events.append(TokenIssued(held))
            elif state.failing is not None:
                events.append(state.failing.event)
            elif server_id not in known:
                events.append(ServerRemoved(server_id))
        return events
