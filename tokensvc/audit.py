"""The audit trail's writer: records are queued and written in batches, so
that logging a token issuance never holds up a ``GetToken`` served from
memory. Admin changes are written by the store in their own transaction.

Issuance is recorded once per (caller, server, token version) in a process,
whether the token went out by GetToken or by a stream: a broker calling
GetToken thousands of times a second for the same token adds one row, not
thousands. The queue is bounded: while the database cannot take records,
at most MAX_PENDING wait; later ones are dropped and counted, and the count
is itself written to the trail (action ``audit_dropped``) once the database
is back, so that the trail says where it has a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from tokensvc import metrics
from tokensvc.auth import Authenticator, Caller
from tokensvc.errors import StoreUnavailable
from tokensvc.store.access import AccessStore, AuditEntry
from tokensvc.token import Clock, utcnow

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
PURGE_INTERVAL = 3600.0
MAX_PENDING = 10_000


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
        # The newest token version recorded as issued, per (caller, server).
        self._issued: dict[tuple[str, str], int] = {}
        self.dropped = 0  # records not kept since the process started
        self._unreported = 0  # dropped, and not yet said so in the trail

    def record(self, actor: str, action: str, server_id: str | None, **detail: Any) -> None:
        """Queues a record; never blocks, never fails (a full queue drops it, counted)."""
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            self._unreported += 1
            metrics.audit_dropped(1)
            return
        self._pending.append(AuditEntry(self._clock(), actor, action, server_id, detail))
        metrics.audit_queued(len(self._pending))

    def issued(self, caller: Caller, server_id: str, version: int, **detail: Any) -> None:
        """Records that ``caller`` got ``version`` of the server's token, unless
        that was recorded already."""
        key = (caller.id or caller.actor, server_id)
        # Not "newer than": a server deleted and registered again counts from 1.
        if self._issued.get(key) == version:
            return
        self._issued[key] = version
        self.record(caller.actor, "issue", server_id, version=version, **detail)

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
        gap, self._unreported = self._unreported, 0
        said = []
        if gap:
            detail = {"count": gap, "limit": MAX_PENDING}
            said.append(AuditEntry(self._clock(), "tokensvc", "audit_dropped", None, detail))
        try:
            await self._access.write_audit(batch + said)
            if gap:
                log.warning("audit records were dropped: the queue was full", extra=detail)
            if used:
                await self._access.touch(used)
            metrics.audit_written(len(batch))
        except StoreUnavailable:
            self._pending = batch + self._pending  # kept for the next try, not lost
            self._unreported += gap
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
