"""Who holds which SDS secret, across replicas: this replica's Envoy nodes are
kept in memory (tokensvc.sds.Consumers) and written to the database within a
second; GetServer adds the other replicas' from there. A replica refreshes its
rows every HEARTBEAT seconds; rows older than STALE (a replica that died) are
ignored, then purged. On SQLite (one process) there is nobody to share with,
and nothing is written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from datetime import timedelta

from tokensvc.errors import StoreUnavailable
from tokensvc.sds import Consumer, Consumers
from tokensvc.store.consumers import ConsumerStore
from tokensvc.token import Clock, utcnow

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
HEARTBEAT = 10.0
STALE = timedelta(seconds=3 * HEARTBEAT)


class ConsumerRegistry:
    def __init__(self, store: ConsumerStore | None, replica: str, clock: Clock = utcnow) -> None:
        self.local = Consumers(clock, shared=store is not None)
        self._store = store
        self._replica = replica
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._store is None:
            return
        self._task = asyncio.create_task(self._run(), name="sds-consumers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._store is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._store.forget(self._replica)

    async def flush(self) -> None:
        if self._store is None:
            return
        changes = self.local.take_changes()
        if not changes:
            return
        try:
            await self._store.write(self._replica, changes, self._clock())
        except StoreUnavailable:
            self.local.give_back(changes)
            raise

    async def _run(self) -> None:
        since_heartbeat = 0.0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
                since_heartbeat += FLUSH_INTERVAL
                if since_heartbeat >= HEARTBEAT and self._store is not None:
                    since_heartbeat = 0.0
                    now = self._clock()
                    await self._store.heartbeat(self._replica, now, now - STALE)
            except StoreUnavailable:
                log.debug("SDS consumers not shared yet: the database is unavailable")

    async def of(self, server_ids: Collection[str]) -> dict[str, list[Consumer]]:
        """Every replica's consumers of these servers (this one's alone if the
        database is unavailable)."""
        found: dict[str, list[Consumer]] = {sid: self.local.of(sid) for sid in server_ids}
        if self._store is None:
            return found
        with contextlib.suppress(StoreUnavailable):
            others = await self._store.of_others(self._replica, server_ids, self._clock() - STALE)
            for consumer in others:
                found[consumer.server_id].append(consumer)
        for consumers in found.values():
            consumers.sort(key=lambda c: (c.node.id, c.node.cluster))
        return found
