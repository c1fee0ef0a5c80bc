"""The SDS consumers table: each replica writes the Envoy nodes connected to it
and reads the others' (tokensvc.consumers keeps them in step)."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import datetime

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tokensvc.sds import Consumer, Node
from tokensvc.store.tables import sds_consumers as table
from tokensvc.store.transactions import transaction

Change = tuple[str, str, Consumer | None]  # stream id, server id, consumer (None: gone)


class ConsumerStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def write(self, replica: str, changes: Iterable[Change], now: datetime) -> None:
        async with transaction(self.engine) as conn:
            for stream_id, server_id, consumer in changes:
                await conn.execute(
                    delete(table).where(
                        table.c.stream_id == stream_id, table.c.server_id == server_id
                    )
                )
                if consumer is not None:
                    await conn.execute(
                        insert(table).values(
                            stream_id=stream_id,
                            server_id=server_id,
                            replica=replica,
                            node_id=consumer.node.id,
                            cluster=consumer.node.cluster,
                            acked_version=consumer.acked_version,
                            acked_time=consumer.acked_at,
                            nack_error=consumer.nack_error,
                            nack_time=consumer.nacked_at,
                            seen_time=now,
                        )
                    )

    async def heartbeat(self, replica: str, now: datetime, stale_before: datetime) -> None:
        """This replica's rows are current; rows no replica refreshed are purged."""
        async with transaction(self.engine) as conn:
            await conn.execute(
                update(table).where(table.c.replica == replica).values(seen_time=now)
            )
            await conn.execute(delete(table).where(table.c.seen_time < stale_before))

    async def forget(self, replica: str) -> None:
        async with transaction(self.engine) as conn:
            await conn.execute(delete(table).where(table.c.replica == replica))

    async def of_others(
        self, replica: str, server_ids: Collection[str], fresh_after: datetime
    ) -> list[Consumer]:
        """The consumers of these servers held by the other replicas."""
        async with transaction(self.engine) as conn:
            rows = await conn.execute(
                select(table).where(
                    table.c.server_id.in_(list(server_ids)),
                    table.c.replica != replica,
                    table.c.seen_time >= fresh_after,
                )
            )
            return [
                Consumer(
                    Node(row.node_id, row.cluster),
                    row.server_id,
                    row.acked_version,
                    row.acked_time,
                    row.nack_error,
                    row.nack_time,
                )
                for row in rows
            ]
