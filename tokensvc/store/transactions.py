"""Where a store's transactions run. Each is one piece of synchronous work on a
connection (``Work``), run whole, with database faults turned into
StoreUnavailable:

- on a SQLite file, inline on the event loop, on one connection. One process
  owns the file (engine.lock_sqlite) and every transaction of that process runs
  here, one after another and never interleaved, so none waits for another's
  lock and none is handed to a thread and back. A transaction does not yield
  to the loop: each is a few statements, and the few that could be long (the
  audit purge) go in batches. The WAL checkpoints, which fsync and took 5 ms
  in a measurement, are taken in a thread instead of by the commit that
  filled the WAL;
- on PostgreSQL (and an in-memory SQLite, which only the tests use), on the
  async engine's connection, through SQLAlchemy's greenlet bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokensvc.errors import StoreUnavailable
from tokensvc.store.engine import sqlite_twin

T = TypeVar("T")
# One transaction's work, on a synchronous connection.
Work = Callable[[Connection], T]

# Commits between two checkpoints: a refresh writes three or four pages, so
# about SQLite's own default of 1,000 pages.
CHECKPOINT_EVERY = 250
# A checkpoint in the thread leaves the WAL to be reused from its start only
# if no commit came while it ran; under commits without a pause the WAL would
# grow without end. Past this many pages, or with the thread's checkpoint
# still running LAGGING * CHECKPOINT_EVERY commits after it began, the next
# commit checkpoints in line (see InlineSQLite._after_commit).
WAL_LIMIT = 2000
LAGGING = 4
# How long a transaction on the event loop waits for a lock another process
# holds (a backup, an operator's sqlite3 shell) before the store is
# unavailable: the loop serves nothing meanwhile.
INLINE_BUSY_MS = 2000


@contextmanager
def faults() -> Iterator[None]:
    """Database faults become StoreUnavailable."""
    try:
        yield
    except (
        OperationalError,
        InterfaceError,
        sqlite3.OperationalError,
        OSError,
        TimeoutError,
    ) as exc:
        raise StoreUnavailable(f"the database is unavailable ({type(exc).__name__})") from None
    except DBAPIError as exc:
        if exc.connection_invalidated or _unavailable(exc):
            raise StoreUnavailable("the database connection was lost") from None
        raise


def _unavailable(exc: DBAPIError) -> bool:
    """SQLSTATE classes that mean "not now" rather than "wrong": connection
    exceptions (08), shutting down or starting up (57P), out of resources (53)."""
    state = str(getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or "")
    return state.startswith(("08", "57P", "53"))


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """One transaction on the async engine; database faults become StoreUnavailable."""
    with faults():
        async with engine.begin() as conn:
            yield conn


class Transactions:
    """Runs a store's transactions (see the module's docstring for where)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        twin = sqlite_twin(engine)
        self._inline = InlineSQLite(twin) if twin is not None else None

    async def run(self, work: Work[T]) -> T:
        if self._inline is not None:
            return self._inline.run(work)
        async with transaction(self.engine) as conn:
            return await conn.run_sync(work)

    async def close(self) -> None:
        if self._inline is not None:
            await self._inline.close()
        await self.engine.dispose()


class InlineSQLite:
    """Transactions on one SQLite connection, in the calling thread; WAL
    checkpoints in another thread, every CHECKPOINT_EVERY commits."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None
        self._commits = 0  # since the last checkpoint began
        # Not an asyncio future: a run of transactions that never yields to
        # the loop must still see when the checkpoint is done.
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="tokensvc-checkpoint")
        self._checkpoint: Future[int] | None = None

        @event.listens_for(engine, "connect")
        def _no_checkpoint_on_commit(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA wal_autocheckpoint=0")
            cursor.execute(f"PRAGMA busy_timeout={INLINE_BUSY_MS}")
            cursor.close()

    def run(self, work: Work[T]) -> T:
        try:
            with faults():
                conn = self._conn = self._conn or self._engine.connect()
                # The write lock from the start (see engine._configure_sqlite),
                # taken here rather than in a "begin" listener: with no
                # listener on the connection, SQLAlchemy dispatches no event
                # for any statement (about 25 µs less a transaction here).
                cursor = conn.connection.cursor()
                cursor.execute("BEGIN IMMEDIATE")
                cursor.close()
                with conn.begin():
                    result = work(conn)
        except BaseException:
            _discarded(self._conn)  # whatever failed, the next one starts afresh
            self._conn = None
            raise
        self._after_commit()
        return result

    def _after_commit(self) -> None:
        """Starts a checkpoint in the thread every CHECKPOINT_EVERY commits;
        checkpoints in line, as SQLite itself would have, when the thread's
        found the WAL grown past WAL_LIMIT or has not finished after
        LAGGING times as many commits (then it is waited for first)."""
        self._commits += 1
        last, lagging = self._checkpoint, self._commits >= LAGGING * CHECKPOINT_EVERY
        if last is not None and (last.done() or lagging):
            self._checkpoint = None
            try:
                grown = last.result() > WAL_LIMIT
            except sqlite3.Error:
                grown = False  # tried again after the next commits
            if grown or lagging:
                self._commits = 0
                with contextlib.suppress(sqlite3.Error):
                    self._checkpointed()
        if self._checkpoint is None and self._commits >= CHECKPOINT_EVERY:
            self._commits = 0
            self._checkpoint = self._checkpointer.submit(self._checkpointed)

    def _checkpointed(self) -> int:
        """Copies the WAL into the database as far as no reader holds it back
        (PASSIVE: it waits for nobody, and writers do not wait for it);
        returns the pages in the WAL."""
        database = self._engine.url.database
        assert database is not None
        with contextlib.closing(sqlite3.connect(database, timeout=0)) as conn:
            _busy, pages, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(pages)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.shutdown)
        _discarded(self._conn)  # the last connection to close checkpoints the rest
        self._conn = None
        self._engine.dispose()


def _discarded(conn: Connection | None) -> None:
    """Closes ``conn``; a connection a fault broke may fail to, harmlessly."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
