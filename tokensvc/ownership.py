"""Refresh ownership across replicas: which live replica refreshes which server.

Every PostgreSQL replica writes a heartbeat row every few seconds, stamped by
the database's clock (tokensvc.store.replicas); the live replicas are those
whose heartbeat is younger than a TTL. Each server belongs to the live replica
with the highest rendezvous weight for it (highest-random-weight hashing):
every replica computes the same owner from the same live set without talking
to the others, the servers spread evenly, and when a replica joins or leaves
only the servers it takes or gives move.

The owner refreshes a server on the policy's schedule. The others keep a
later entry as a fallback, where the token's remaining life has shrunk to a
safety share, so that even a wrong view of the membership never lets a token
expire; the advisory lock (tokensvc.store.rows) still keeps one request in
flight, so a fallback that fires finds the owner's token and takes it. When
the membership changes, every server that changed hands is scheduled again:
one that is due (or overdue) now belongs here is refreshed at once.

SQLite serves one process: its membership is itself, and it owns everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from tokensvc import metrics
from tokensvc.errors import StoreUnavailable
from tokensvc.held import ServerState
from tokensvc.policy import RefreshPolicy
from tokensvc.store import Store
from tokensvc.store.notify import ChangeKind
from tokensvc.store.replicas import ReplicaTable

if TYPE_CHECKING:
    from tokensvc.manager import TokenManager
    from tokensvc.settings import Settings

log = logging.getLogger(__name__)

# A replica that does not own a server steps in once the token has this share
# left of the life that the owner's refresh time leaves it (half of half: at
# three quarters of the lifetime, with the default refresh fraction).
FALLBACK_SHARE = 0.5


def weight(replica_id: str, server_id: str) -> int:
    """The rendezvous weight of a replica for a server: a stable hash of both."""
    data = f"{replica_id}\x00{server_id}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def owner_of(server_id: str, replicas: Collection[str]) -> str:
    """The replica that refreshes the server: the highest weight (ties, which
    a 64-bit hash makes all but impossible, go to the greater id)."""
    return max(replicas, key=lambda replica: (weight(replica, server_id), replica))


class Membership:
    """This replica's view of the live replicas (itself always among them)."""

    def __init__(self, me: str, live: Iterable[str] = ()) -> None:
        self.me = me
        self.live: frozenset[str] = frozenset({me, *live})
        self._owns: dict[str, bool] = {}

    def owns(self, server_id: str) -> bool:
        if len(self.live) == 1:
            return True
        owned = self._owns.get(server_id)
        if owned is None:
            owned = self._owns[server_id] = owner_of(server_id, self.live) == self.me
        return owned

    def update(self, live: Iterable[str]) -> bool:
        """Takes a new view; whether it differs from the last one."""
        fresh = frozenset({self.me, *live})
        if fresh == self.live:
            return False
        self.live = fresh
        self._owns.clear()
        return True

    def moved(self, before: frozenset[str], server_ids: Iterable[str]) -> list[str]:
        """The servers this replica owns now and did not under ``before``, or
        the other way round."""
        return [
            sid
            for sid in server_ids
            if self.owns(sid) != (owner_of(sid, before | {self.me}) == self.me)
        ]


class Duty:
    """When this replica refreshes a server: the policy's time if it owns it,
    a fallback later if not."""

    def __init__(self, membership: Membership, policy: RefreshPolicy, takeover: timedelta) -> None:
        self.membership = membership
        self.policy = policy
        # How long an owner may be gone before the others notice (TTL and a beat).
        self.takeover = takeover

    def due(self, server_id: str, state: ServerState, now: datetime) -> datetime:
        owner = self.membership.owns(server_id)
        failing = state.failing
        if failing is not None and failing.event.next_attempt is not None:
            # The owner retries on its backoff; the others only after it.
            at = failing.event.next_attempt
            return at if owner else at + self.takeover
        if state.token is not None:
            token = state.token.token
            at = self.policy.replace_at(token, state.refresh_fraction)
            return at if owner else at + (token.expires_at - at) * FALLBACK_SHARE
        return now if owner else now + self.takeover


def rebalance(manager: TokenManager, before: frozenset[str]) -> None:
    """The live replicas changed: the servers that changed hands are scheduled
    again (one now owned here and due is refreshed at once)."""
    for server_id in manager.duty.membership.moved(before, manager.servers.known()):
        if manager.servers.get(server_id).flight is None:  # its landing schedules it
            manager.schedule_refresh(server_id)


def owned(manager: TokenManager) -> int:
    """How many of the registered servers this replica refreshes."""
    owns = manager.duty.membership.owns
    return sum(1 for server_id in manager.servers.known() if owns(server_id))


class Heartbeat:
    """Writes this replica's heartbeat every ``interval`` and keeps the
    membership current; ``on_change`` gets the live set it replaced. Without
    a table (SQLite) the membership is this replica alone."""

    def __init__(
        self,
        table: ReplicaTable | None,
        membership: Membership,
        *,
        interval: timedelta,
        ttl: timedelta,
        announce: Callable[[], Awaitable[None]],
        owned: Callable[[], int],
    ) -> None:
        self._table = table
        self.membership = membership
        self._interval = interval.total_seconds()
        self._ttl = ttl
        self._announce = announce
        self._owned = owned
        self.on_change: Callable[[frozenset[str]], None] = lambda _before: None
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    @classmethod
    def of(cls, store: Store, manager: TokenManager, settings: Settings) -> Heartbeat:
        """The heartbeat of a service: on the store's table if it is shared."""
        heartbeat = cls(
            ReplicaTable(store.engine) if store.shared else None,
            manager.duty.membership,
            interval=settings.heartbeat_interval,
            ttl=settings.heartbeat_ttl,
            announce=lambda: store.announce(ChangeKind.REPLICAS),
            owned=lambda: owned(manager),
        )
        heartbeat.on_change = lambda before: rebalance(manager, before)
        return heartbeat

    async def beat(self) -> None:
        """One heartbeat, and the live set it reads."""
        if self._table is not None:
            live = await self._table.beat(self.membership.me, self._ttl)
            before = self.membership.live
            if self.membership.update(live):
                log.info(
                    "replicas changed",
                    extra={"live": len(self.membership.live), "before": len(before)},
                )
                self.on_change(before)
        metrics.ownership(len(self.membership.live), self._owned())

    def poke(self) -> None:
        """Another replica joined or left: look now rather than at the next beat."""
        self._poked.set()

    async def join(self) -> None:
        """The first heartbeat, told to the others so that they look at once."""
        await self.beat()
        if self._table is not None:
            await self._announce()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # not wait_for: see scheduler.py
                async with asyncio.timeout(self._interval):
                    await self._poked.wait()
            self._poked.clear()
            try:
                await self.beat()
                self._failing = False
            except StoreUnavailable:
                # The last view stands: while the database is out nobody fetches.
                if not self._failing:
                    log.warning("could not write the replica heartbeat")
                self._failing = True
            except Exception as exc:  # the next beat tries again
                log.warning("replica heartbeat failed", extra={"exc_type": type(exc).__name__})

    async def stop(self) -> None:
        """Stops beating and leaves: the others take this replica's servers now."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._table is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._table.leave(self.membership.me)
                await self._announce()
