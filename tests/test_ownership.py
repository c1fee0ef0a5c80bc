"""Refresh ownership across replicas: rendezvous hashing (pure), the due times
of owners and of the others (an injected clock), membership changes handing
servers over, heartbeats in PostgreSQL (stale rows by the database's clock),
the token a notification carries to the others (sealed, and only opened
where it was meant to be), and a scheduler that stops even when woken as it
is cancelled."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from tokensvc.crypto import KeyRing, generate_key_entry
from tokensvc.manager import TokenManager
from tokensvc.ownership import FALLBACK_SHARE, Duty, Membership, owner_of, rebalance
from tokensvc.policy import RefreshPolicy
from tokensvc.registration import Credential, ServerSpec
from tokensvc.scheduler import Scheduler
from tokensvc.store import Store, create_engine, migrate
from tokensvc.store.notify import Change, ChangeKind
from tokensvc.store.replicas import ReplicaTable
from tokensvc.token import ServerToken, Token

from support import FakeClock, create_pg_database, drop_pg_database, manager_over

SERVERS = [f"srv-{i:05d}" for i in range(3000)]
REPLICAS = ["host-a:101:1f2e", "host-b:102:3d4c", "host-c:103:5b6a"]
LIFETIME = timedelta(seconds=100)
TAKEOVER = timedelta(seconds=8)


# rendezvous hashing ----------------------------------------------------------


def test_three_replicas_share_3000_servers_within_ten_percent_of_a_third_each() -> None:
    shares = Counter(owner_of(sid, REPLICAS) for sid in SERVERS)
    assert set(shares) == set(REPLICAS)
    for count in shares.values():
        assert abs(count - 1000) <= 100, shares


def test_when_a_replica_leaves_only_its_servers_move() -> None:
    before = {sid: owner_of(sid, REPLICAS) for sid in SERVERS}
    after = {sid: owner_of(sid, REPLICAS[:2]) for sid in SERVERS}
    moved = {sid for sid in SERVERS if before[sid] != after[sid]}
    assert moved == {sid for sid in SERVERS if before[sid] == REPLICAS[2]}
    # And when it comes back, exactly those return to it.
    assert {sid for sid in SERVERS if owner_of(sid, REPLICAS) != after[sid]} == moved


def test_every_replica_computes_the_same_owner_whatever_the_order_it_lists_them() -> None:
    shuffled = REPLICAS[:]
    random.Random(7).shuffle(shuffled)
    assert all(owner_of(sid, shuffled) == owner_of(sid, REPLICAS) for sid in SERVERS[:300])


def test_a_membership_of_one_owns_everything_and_moved_names_what_changed_hands() -> None:
    me = Membership(REPLICAS[0])
    assert all(me.owns(sid) for sid in SERVERS[:100])
    assert me.update(REPLICAS)
    assert not me.update(REPLICAS[1:])  # itself is always live: nothing changed
    owned = {sid for sid in SERVERS if me.owns(sid)}
    assert 800 < len(owned) < 1200
    before = me.live
    assert me.update(REPLICAS[:1])
    assert set(me.moved(before, SERVERS)) == set(SERVERS) - owned


# due times, with an injected clock -------------------------------------------


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[TokenManager, Membership, FakeClock]]:
    """A manager on SQLite whose membership the test sets (three replicas,
    itself the first), and a clock that moves only when told to."""
    clock = FakeClock()
    calls: list[str] = []

    async def fetch(spec: ServerSpec, credential: Credential) -> Token:
        calls.append(spec.id)
        now = clock()
        return Token(f"{spec.id}-{len(calls)}", "Bearer", now, now + LIFETIME)

    membership = Membership(REPLICAS[0], REPLICAS)
    options = {"policy": RefreshPolicy(jitter=0), "membership": membership, "takeover": TAKEOVER}
    async with manager_over(tmp_path, fetch, clock, SERVERS[:30], **options) as manager:
        manager.calls = calls  # type: ignore[attr-defined]
        yield manager, membership, clock


def _split(membership: Membership) -> tuple[list[str], list[str]]:
    mine = [sid for sid in SERVERS[:30] if membership.owns(sid)]
    return mine, [sid for sid in SERVERS[:30] if not membership.owns(sid)]


async def test_only_the_owner_refreshes_and_the_others_keep_a_later_fallback(
    world: tuple[TokenManager, Membership, FakeClock],
) -> None:
    manager, membership, clock = world
    mine, theirs = _split(membership)
    assert mine and theirs
    start = clock()
    # A new registration: fetched here at once if owned, else only after a takeover.
    assert sorted(await manager.scheduler.run_due()) == sorted(mine)
    assert sorted(manager.calls) == sorted(mine)  # type: ignore[attr-defined]
    assert {manager.scheduler.due_at(sid) for sid in theirs} == {start + TAKEOVER}
    # The owner's token is due at half its life; a non-owner's fallback later.
    for sid in mine:
        assert manager.scheduler.due_at(sid) == start + LIFETIME / 2
    held = manager.cached(mine[0])
    assert held is not None
    other = Duty(Membership(REPLICAS[1], REPLICAS), manager.policy, TAKEOVER)
    state = manager.servers.get(mine[0])
    if other.membership.owns(mine[0]):
        other = Duty(Membership(REPLICAS[2], REPLICAS), manager.policy, TAKEOVER)
    fallback = other.due(mine[0], state, clock())
    assert fallback == start + LIFETIME / 2 + LIFETIME / 2 * FALLBACK_SHARE
    assert fallback < held.token.expires_at


async def test_servers_of_a_replica_whose_heartbeat_stopped_are_refreshed_here_at_once_if_due(
    world: tuple[TokenManager, Membership, FakeClock],
) -> None:
    manager, membership, clock = world
    await manager.scheduler.run_due()  # mine fetched; theirs wait for their owners
    mine, theirs = _split(membership)
    clock.advance(TAKEOVER.total_seconds())
    await manager.scheduler.run_due()  # nobody else fetched: the fallback did
    assert sorted(manager.calls) == sorted(mine + theirs)  # type: ignore[attr-defined]
    clock.advance(LIFETIME.total_seconds() / 2)  # every token is past its refresh time
    # Each token of theirs is due at its fallback, a quarter life from now ...
    assert all(manager.scheduler.due_at(sid) > clock() for sid in theirs)
    # ... until their owners' heartbeats go stale: then they are due here now.
    before = membership.live
    membership.update(REPLICAS[:1])
    rebalance(manager, before)
    assert all(manager.scheduler.due_at(sid) == clock() for sid in theirs)
    calls = len(manager.calls)  # type: ignore[attr-defined]
    assert sorted(await manager.scheduler.run_due()) == sorted(mine + theirs)
    assert len(manager.calls) == calls + len(mine + theirs)  # type: ignore[attr-defined]
    # And when they come back, the servers go back to them, not yet due.
    before = membership.live
    membership.update(REPLICAS)
    rebalance(manager, before)
    for sid in theirs:
        held = manager.cached(sid)
        assert held is not None
        assert manager.scheduler.due_at(sid) == held.token.issued_at + LIFETIME * 0.75


# heartbeats in PostgreSQL -----------------------------------------------------


async def test_a_replica_whose_heartbeat_is_stale_by_the_database_clock_is_not_live() -> None:
    url = await create_pg_database()
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine)
        table = ReplicaTable(engine)
        ttl = timedelta(seconds=30)
        assert await table.beat("a", ttl) == {"a"}
        assert await table.beat("b", ttl) == {"a", "b"}
        async with engine.begin() as conn:  # b's last beat, 31 s ago by the database's clock
            await conn.exec_driver_sql(
                "UPDATE replicas SET heartbeat_time = now() - interval '31 seconds' WHERE id = 'b'"
            )
        assert await table.beat("a", ttl) == {"a"}
        assert await table.beat("b", ttl) == {"a", "b"}  # b is back
        await table.leave("b")
        assert await table.beat("a", ttl) == {"a"}
    finally:
        await engine.dispose()
        await drop_pg_database(url)


# the token a notification carries ----------------------------------------------


async def test_a_notification_carries_the_token_sealed_and_it_opens_only_for_its_server(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    store = Store(engine, KeyRing.parse(generate_key_entry()), clock)
    other = Store(engine, KeyRing.parse(generate_key_entry()), clock)
    try:
        now = clock()
        token = Token("secret-access-token", "Bearer", now, now + LIFETIME, ("read",))
        held = ServerToken("alpha", token, 7, 2)
        change = Change("origin", ChangeKind.TOKEN, "alpha", 7, False, store.seal_announced(held))
        payload = change.payload()
        assert "secret-access-token" not in payload
        parsed = Change.parse(payload)
        assert parsed == change
        opened = store.open_announced("alpha", parsed.sealed)
        assert opened == held
        assert opened.token.access_token == "secret-access-token"
        assert store.open_announced("beta", parsed.sealed) is None  # moved to another server
        assert other.open_announced("alpha", parsed.sealed) is None  # another key
        assert store.open_announced("alpha", parsed.sealed[:-8] + "AAAAAAA=") is None
    finally:
        await engine.dispose()


# the scheduler's stop --------------------------------------------------------


async def test_the_scheduler_stops_even_when_a_schedule_wakes_it_as_it_is_cancelled() -> None:
    clock = FakeClock()

    async def run(key: str) -> None:
        return None

    for _ in range(20):
        scheduler = Scheduler(run, clock)
        scheduler.schedule("later", clock() + timedelta(hours=1))
        scheduler.start()
        await asyncio.sleep(0)  # the loop waits for its wake-up
        scheduler.schedule("later", clock() + timedelta(hours=2))  # wakes it ...
        await asyncio.wait_for(scheduler.stop(), 5)  # ... as stop() cancels it
