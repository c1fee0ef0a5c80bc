"""The audit trail's writer: records are queued and written in batches, so
that logging a token issuance never holds up a ``GetToken`` served from
memory. Admin changes are written by the store in their own transaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from tokensvc import metrics
from tokensvc.auth import Authenticator
from tokensvc.errors import StoreUnavailable
from tokensvc.store.access import AccessStore, AuditEntry
from tokensvc.token import Clock, utcnow

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
PURGE_INTERVAL = 3600.0


class AuditLog:
    def __init__(
        self,
        access: AccessStore,
        authenticator: Authenticator,
        retention: timedelta,
        clock: Clock = utcnow,
    ) -> None:
        self._access = access
        self._auth = authenticator
        self._retention = retention
        self._clock = clock
        self._pending: list[AuditEntry] = []
        self._task: asyncio.Task[None] | None = None

    def record(self, actor: str, action: str, server_id: str | None, **detail: Any) -> None:
        """Queues a record; never blocks, never fails."""
        self._pending.append(AuditEntry(self._clock(), actor, action, server_id, detail))
        metrics.audit_queued(len(self._pending))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with contextlib.suppress(StoreUnavailable):
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        used, self._auth.used = self._auth.used, {}
        try:
            await self._access.write_audit(batch)
            if used:
                await self._access.touch(used)
            metrics.audit_written(len(batch))
        except StoreUnavailable:
            self._pending = batch + self._pending  # kept for the next try, not lost
            self._auth.used = {**used, **self._auth.used}
            raise
        finally:
            metrics.audit_queued(len(self._pending))

    async def _run(self) -> None:
        since_purge = PURGE_INTERVAL
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
                since_purge += FLUSH_INTERVAL
                if since_purge >= PURGE_INTERVAL:
                    since_purge = 0.0
                    removed = await self._access.purge_audit(self._retention, self._clock())
                    if removed:
                        log.info("old audit events removed", extra={"count": removed})
            except StoreUnavailable:
                log.warning("audit trail not written yet: the database is unavailable")
