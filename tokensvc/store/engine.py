"""Engines for SQLite (the embedded default) and PostgreSQL."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tokensvc.errors import ConfigurationError

# PostgreSQL connections per process: 3 replicas and their listeners stay well
# under PostgreSQL's default max_connections (100).
PG_POOL_SIZE, PG_MAX_OVERFLOW = 10, 10
# At most this many of them hold a refresh lock (Rows.refresh_lock) at once, so
# that the others remain for what the holders do under it (read the server,
# save the token) and for every other transaction: with all of them holding
# locks, each holder would wait for a connection none gives back.
PG_REFRESH_LOCKS = 12


def create_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(
            url, pool_pre_ping=True, pool_size=PG_POOL_SIZE, max_overflow=PG_MAX_OVERFLOW
        )
    if parsed.database and parsed.database != ":memory:":
        path = Path(parsed.database)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Only ciphertext is secret in there, but nobody else needs to read it.
        path.touch(mode=0o600, exist_ok=True)
    engine = create_async_engine(url, connect_args={"timeout": 30})
    _configure_sqlite(engine.sync_engine)
    return engine


def sqlite_twin(engine: AsyncEngine) -> Engine | None:
    """A synchronous engine on the same SQLite file, for transactions run whole
    in one thread: aiosqlite hands each DBAPI call (cursor, execute, fetch,
    close, commit) to its thread and back, and those hops cost several times
    what SQLite does. None for PostgreSQL, and for an in-memory database (a
    second engine would open another one)."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    twin = sqlalchemy.create_engine(
        url.set(drivername="sqlite+pysqlite"), connect_args={"timeout": 30}
    )
    _configure_sqlite(twin, begin=False)  # transactions.InlineSQLite begins its own
    return twin


def _configure_sqlite(engine: Engine, begin: bool = True) -> None:
    # pysqlite's deferred BEGIN lets two writers read the same row and both
    # write, one silently losing. Take the write lock when a transaction
    # begins (BEGIN IMMEDIATE) and let SQLAlchemy, not the driver, begin them
    # (or, with ``begin`` False, whoever runs the transactions).
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA busy_timeout=30000",
            "PRAGMA foreign_keys=ON",
            "PRAGMA synchronous=NORMAL",
        ):
            cursor.execute(pragma)
        cursor.close()

    if not begin:
        return

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def lock_sqlite(url: str) -> int | None:
    """One process per SQLite database: SQLite has no way to share tokens,
    rotations or single flight between processes. PostgreSQL does."""
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    path = Path(database + ".lock")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 100).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigurationError(
            f"{database} is in use by {holder}: SQLite serves one process; for several "
            "replicas use PostgreSQL (--database-url postgresql+asyncpg://...); to add a "
            "caller to a running service, use AdminService/CreateCaller"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"tokensvc pid {os.getpid()}".encode())
    return fd
