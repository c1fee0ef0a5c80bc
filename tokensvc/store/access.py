"""Who may call (callers) and what was done (the audit trail, read side)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from tokensvc.errors import InvalidArgument, LastAdmin
from tokensvc.store.records import audit_row
from tokensvc.store.tables import audit_events, callers
from tokensvc.store.transactions import Transactions

# Audit rows deleted per transaction by purge_audit.
PURGE_BATCH = 1000


@dataclass(frozen=True, slots=True)
class CallerRecord:
    id: str
    name: str
    kind: str  # key | certificate
    identity: str
    key_hash: str | None
    roles: tuple[str, ...]
    server_patterns: tuple[str, ...]
    create_time: datetime
    last_used_time: datetime | None
    revoke_time: datetime | None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    time: datetime
    actor: str
    peer: str
    action: str
    server_id: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An audit row to write: actor is "who@peer"."""

    time: datetime
    actor: str
    action: str
    server_id: str | None
    detail: dict[str, Any]


def _caller(row: Row[Any]) -> CallerRecord:
    return CallerRecord(
        id=row.id,
        name=row.name,
        kind=row.kind,
        identity=row.identity,
        key_hash=row.key_hash,
        roles=tuple(json.loads(row.roles)),
        server_patterns=tuple(json.loads(row.server_patterns)),
        create_time=row.create_time,
        last_used_time=row.last_used_time,
        revoke_time=row.revoke_time,
    )


class AccessStore:
    """Callers and the audit trail, in the transactions of the server store
    (``Rows.transactions``)."""

    def __init__(self, transactions: Transactions) -> None:
        self._run = transactions.run

    async def create_caller(self, record: CallerRecord) -> None:
        statement = insert(callers).values(
            id=record.id,
            name=record.name,
            kind=record.kind,
            identity=record.identity,
            key_hash=record.key_hash,
            roles=json.dumps(list(record.roles)),
            server_patterns=json.dumps(list(record.server_patterns)),
            create_time=record.create_time,
        )
        try:
            await self._run(lambda conn: conn.execute(statement))
        except IntegrityError:
            raise InvalidArgument(
                "name", f"a caller named {record.name!r} exists already: choose another name"
            ) from None

    async def list_callers(self) -> list[CallerRecord]:
        query = select(callers).order_by(callers.c.create_time)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [_caller(row) for row in rows]

    async def revoke_caller(self, caller_id: str, now: datetime) -> CallerRecord | None:
        """Revokes a caller, unless it is the last admin (LastAdmin). Rows are
        never deleted: a revoked caller stays the record that callers existed,
        which keeps open mode from ever coming back."""

        def work(conn: Connection) -> Row[Any] | None:
            # Locked (SQLite: the write transaction), so that two admins
            # revoking each other at once cannot both succeed.
            active = conn.execute(
                select(callers.c.id, callers.c.name, callers.c.roles)
                .where(callers.c.revoke_time.is_(None))
                .with_for_update()
            ).all()
            admins = {row.id: row.name for row in active if "admin" in json.loads(row.roles)}
            if caller_id in admins and len(admins) == 1:
                raise LastAdmin(
                    f"caller {admins[caller_id]!r} is the last admin: revoking it would leave "
                    "no one to administer tokensvc, which never reopens to anonymous callers. "
                    "Create another admin first (CreateCaller, or tokensvc create-caller on "
                    "the host), then revoke this one"
                )
            conn.execute(
                update(callers)
                .where(callers.c.id == caller_id, callers.c.revoke_time.is_(None))
                .values(revoke_time=now)
            )
            return conn.execute(select(callers).where(callers.c.id == caller_id)).first()

        row = await self._run(work)
        return _caller(row) if row is not None else None

    async def touch(self, used: dict[str, datetime]) -> None:
        def work(conn: Connection) -> None:
            for caller_id, when in used.items():
                conn.execute(
                    update(callers).where(callers.c.id == caller_id).values(last_used_time=when)
                )

        await self._run(work)

    async def write_audit(self, entries: list[AuditEntry]) -> None:
        if not entries:
            return
        rows = [audit_row(e.time, e.actor, e.action, e.server_id, e.detail) for e in entries]
        await self._run(lambda conn: conn.execute(insert(audit_events), rows))

    async def list_audit(
        self,
        *,
        server_id: str = "",
        actor: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
        before_id: int = 0,
        limit: int = 100,
    ) -> list[AuditEvent]:
        """Newest first; ``before_id`` continues a page."""
        query = select(audit_events).order_by(audit_events.c.id.desc()).limit(limit)
        if server_id:
            query = query.where(audit_events.c.server_id == server_id)
        if actor:
            query = query.where(audit_events.c.actor == actor)
        if start is not None:
            query = query.where(audit_events.c.time >= start)
        if end is not None:
            query = query.where(audit_events.c.time < end)
        if before_id:
            query = query.where(audit_events.c.id < before_id)
        rows = await self._run(lambda conn: conn.execute(query).all())
        return [
            AuditEvent(
                row.id,
                row.time,
                row.actor,
                row.peer,
                row.action,
                row.server_id or "",
                json.loads(row.detail),
            )
            for row in rows
        ]

    async def purge_audit(self, older_than: timedelta, now: datetime) -> int:
        """Deletes audit rows older than ``older_than``, PURGE_BATCH at a time,
        each batch a transaction of its own: on SQLite a transaction holds the
        event loop, so none may be long."""
        cutoff = now - older_than
        oldest = (
            select(audit_events.c.id)
            .where(audit_events.c.time < cutoff)
            .order_by(audit_events.c.id)
            .limit(PURGE_BATCH)
        )
        statement = delete(audit_events).where(audit_events.c.id.in_(oldest.scalar_subquery()))
        removed = 0
        while count := await self._run(lambda conn: int(conn.execute(statement).rowcount)):
            removed += count
            await asyncio.sleep(0)  # what else is waiting runs between batches
        return removed
