"""The replicas table: each PostgreSQL replica's heartbeat, written with the
database's clock (``now()``), never the replica's, so that replicas whose
clocks disagree still agree on who is live."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.store.tables import replicas as table
from tokensvc.store.transactions import transaction

# Rows of replicas gone without a word (SIGKILL, a lost host) are purged after this.
PURGE_AFTER = timedelta(hours=1)


class ReplicaTable:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def beat(self, replica: str, ttl: timedelta) -> set[str]:
        """Writes this replica's heartbeat; returns the replicas whose last
        heartbeat is younger than ``ttl`` (this one among them)."""
        now = func.now()
        async with transaction(self.engine) as conn:
            await conn.execute(
                insert(table)
                .values(id=replica, heartbeat_time=now, start_time=now)
                .on_conflict_do_update(index_elements=[table.c.id], set_={"heartbeat_time": now})
            )
            await conn.execute(delete(table).where(table.c.heartbeat_time < now - PURGE_AFTER))
            rows = await conn.execute(select(table.c.id).where(table.c.heartbeat_time > now - ttl))
            return {str(row.id) for row in rows}

    async def leave(self, replica: str) -> None:
        """This replica stops: the others take its servers at their next look."""
        async with transaction(self.engine) as conn:
            await conn.execute(delete(table).where(table.c.id == replica))
