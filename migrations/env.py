"""Alembic environment: runs on the connection tokensvc hands it (see
tokensvc/store/migrate.py), or on TOKENSVC_DATABASE_URL for the alembic CLI."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from tokensvc.store.engine import create_engine
from tokensvc.store.tables import metadata

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_standalone(url: str) -> None:
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(run_on)
    await engine.dispose()


connection = config.attributes.get("connection")
if connection is not None:
    run_on(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("TOKENSVC_DATABASE_URL")
    if not url:
        raise SystemExit("set TOKENSVC_DATABASE_URL (or use `tokensvc migrate`)")
    asyncio.run(run_standalone(url))
