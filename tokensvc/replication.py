"""Replication: what other replicas did, brought into this process's token manager.

A notification names a change; a stored token's carries it sealed under the
data key, opened here without a read (a token too big for a notification, and
every other change, is read from its row). After a listener reconnection, notifications may have
been lost, so everything the database says is compared with what is held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokensvc.errors import error_of
from tokensvc.store import ServerRecord, Store
from tokensvc.store.notify import Change, ChangeKind
from tokensvc.token import Clock

if TYPE_CHECKING:
    from tokensvc.manager import TokenManager


class Replication:
    def __init__(self, manager: TokenManager, store: Store, clock: Clock) -> None:
        self._manager = manager
        self._store = store
        self._clock = clock

    async def apply(self, change: Change) -> None:
        """Another replica changed a server: read the row and bring this
        process and its watchers up to date."""
        manager, server_id = self._manager, change.server_id
        if change.kind is ChangeKind.REMOVED:
            if manager.servers.get(server_id).registered:
                manager.removed(server_id)
        elif change.kind is ChangeKind.REGISTERED:
            record = await self._store.get_server(server_id)
            manager.registered(record, change.revised)
            if change.revised and record.status.expires_at is not None:
                # Its first token came (and was applied) while the record was read.
                await self._adopt_stored(server_id)
        elif change.kind is ChangeKind.TOKEN:
            # Opened at once, before any other change is applied: notifications
            # come in commit order, so this token is of the current revision.
            held = self._store.open_announced(server_id, change.sealed) if change.sealed else None
            if held is None:
                await self._adopt_stored(server_id)
            else:
                manager.adopt(server_id, manager.servers.get(server_id).epoch, held)
        elif change.kind is ChangeKind.FAILED:
            self._failed_elsewhere(await self._store.get_server(server_id))

    async def _adopt_stored(self, server_id: str) -> None:
        epoch = self._manager.servers.get(server_id).epoch  # before the read: a change wins
        held = await self._store.load_token(server_id)
        if held is not None:
            self._manager.adopt(server_id, epoch, held)

    def _failed_elsewhere(self, record: ServerRecord) -> None:
        server_id, status = record.spec.id, record.status
        last = status.last_error
        if last is None:
            return
        error = error_of(last.reason, last.error, last.error_description)
        state = self._manager.servers.get(server_id)
        event = state.failure(server_id, error, last.time, status.next_refresh_time, self._clock())
        self._manager.failed(server_id, event, state.failures + 1)

    async def resync(self) -> None:
        """Catches up with everything the database says, after a time in which
        notifications may have been lost (a listener reconnection)."""
        manager, scheduler = self._manager, self._manager.scheduler
        now = self._clock()
        seen = set()
        epochs = manager.servers.epochs()  # before the read: a change meanwhile wins
        for record, stored in await self._store.load_all():
            server_id = record.spec.id
            seen.add(server_id)
            held = manager.cached(server_id)
            if held is not None and held.revision != record.revision:
                manager.registered(record, revised=True)  # changed while we were not told
            elif not manager.servers.get(server_id).registered:
                manager.registered(record, revised=False)
                manager.schedule_refresh(server_id)  # new to us; the stored token may do
            if stored is not None and stored.token.expires_at > now:
                manager.adopt(server_id, epochs.get(server_id, 0), stored)
            if (
                scheduler.due_at(server_id) is None
                and manager.servers.get(server_id).flight is None
            ):
                manager.schedule_refresh(server_id)  # lost its schedule in an outage
        for server_id in manager.servers.known() - seen:
            manager.removed(server_id)
