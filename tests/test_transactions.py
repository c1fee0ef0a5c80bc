"""Where a SQLite store's transactions run: inline on the event loop, on one
connection, with the WAL checkpointed in a thread rather than by a commit."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection

from tokensvc.errors import StoreUnavailable
from tokensvc.store import access, create_engine, transactions
from tokensvc.store.access import AccessStore, AuditEntry
from tokensvc.store.repository import Store
from tokensvc.store.transactions import (
    CHECKPOINT_EVERY,
    LAGGING,
    WAL_LIMIT,
    Transactions,
)
from tokensvc.token import utcnow

PAGE = 4096


@pytest.fixture
async def inline(tmp_path: Path) -> AsyncIterator[tuple[Transactions, Path]]:
    path = tmp_path / "t.db"
    runner = Transactions(create_engine(f"sqlite+aiosqlite:///{path}"))
    await runner.run(lambda conn: conn.execute(text("CREATE TABLE t (id INTEGER, v BLOB)")))
    yield runner, path
    await runner.close()


def _insert(i: int) -> transactions.Work[None]:
    def work(conn: Connection) -> None:
        conn.execute(text("INSERT INTO t VALUES (:i, zeroblob(3000))"), {"i": i})

    return work


async def test_commits_leave_the_checkpoints_to_a_thread_and_the_wal_stays_bounded(
    inline: tuple[Transactions, Path],
) -> None:
    runner, path = inline
    pragma = text("PRAGMA wal_autocheckpoint")
    assert await runner.run(lambda conn: conn.execute(pragma).scalar()) == 0
    commits = 20 * CHECKPOINT_EVERY
    for i in range(commits):  # back to back, never a pause for the thread's checkpoint
        await runner.run(_insert(i))
    assert await runner.run(lambda conn: conn.execute(text("SELECT count(*) FROM t")).scalar()) == (
        commits
    )
    # Each commit adds three pages to the WAL: unchecked, it would hold them
    # all (over 60 MB); checkpoints keep it near WAL_LIMIT pages, and a
    # checkpoint is waited for once LAGGING * CHECKPOINT_EVERY commits came
    # while it ran, however slow the thread.
    bound = (WAL_LIMIT + LAGGING * CHECKPOINT_EVERY * 3) * PAGE
    assert (path.parent / "t.db-wal").stat().st_size < bound < commits * 3 * PAGE


async def test_a_lock_held_by_another_process_makes_the_store_unavailable_soon_not_stuck(
    inline: tuple[Transactions, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runner, path = inline
    monkeypatch.setattr(transactions, "INLINE_BUSY_MS", 200)
    on_the_loop = runner._inline
    assert on_the_loop is not None and on_the_loop._conn is not None
    on_the_loop._conn.close()  # the next connection is made with the patched timeout
    on_the_loop._conn = None
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        await runner.run(_insert(1))
    assert time.monotonic() - started < 20  # the busy wait is bounded: 0.2 s, not 30 s
    other.execute("ROLLBACK")
    other.close()
    await runner.run(_insert(2))  # and the next transaction works again
    assert await runner.run(lambda conn: conn.execute(text("SELECT id FROM t")).scalar()) == 2


async def test_a_failed_transaction_is_rolled_back_and_the_next_one_starts_afresh(
    inline: tuple[Transactions, Path],
) -> None:
    runner, _ = inline

    def half_done(conn: Connection) -> None:
        _insert(1)(conn)
        raise ValueError("stop")

    with pytest.raises(ValueError, match="stop"):
        await runner.run(half_done)
    await runner.run(_insert(2))
    ids = await runner.run(lambda conn: conn.execute(text("SELECT id FROM t")).scalars().all())
    assert ids == [2]


async def test_a_transaction_on_the_loop_is_not_interleaved_with_another(
    inline: tuple[Transactions, Path],
) -> None:
    """Hundreds of read-modify-write transactions at once lose no update."""
    runner, _ = inline
    await runner.run(_insert(0))

    def increment(conn: Connection) -> None:
        value = conn.execute(text("SELECT id FROM t")).scalar_one()
        conn.execute(text("UPDATE t SET id = :v"), {"v": value + 1})

    await asyncio.gather(*(runner.run(increment) for _ in range(300)))
    assert await runner.run(lambda conn: conn.execute(text("SELECT id FROM t")).scalar()) == 300


async def test_old_audit_events_are_purged_in_batches_and_newer_ones_kept(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "PURGE_BATCH", 7)
    trail = AccessStore(store.transactions)
    now = utcnow()
    old = [AuditEntry(now - timedelta(days=40), "a@p", "issue", "s", {}) for _ in range(20)]
    new = [AuditEntry(now - timedelta(days=1), "a@p", "issue", "s", {"n": i}) for i in range(3)]
    await trail.write_audit(old + new)
    assert await trail.purge_audit(timedelta(days=30), now) == 20
    kept = await trail.list_audit(limit=100)
    assert sorted(event.detail["n"] for event in kept) == [0, 1, 2]
