"""The watch protocol on its own, without gRPC: an EventBus, a snapshot
function, and the Watch that every stream (WatchTokens, Envoy SDS) consumes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from datetime import timedelta

from tokensvc.events import Event, EventBus, ServerRemoved, TokenIssued, TokenRevoked
from tokensvc.token import ServerToken, Token, utcnow
from tokensvc.watch import CallerRevoked, Synced, Update, Watch


def issued(server_id: str, version: int) -> TokenIssued:
    now = utcnow()
    token = Token(f"tok-{server_id}-{version}", "Bearer", now, now + timedelta(minutes=5))
    return TokenIssued(ServerToken(server_id, token, version, revision=1))


class State:
    """The current state the snapshot reads, and a bus that publishes changes."""

    def __init__(self, *events: Event) -> None:
        self.bus = EventBus()
        self.events = list(events)
        self.snapshots = 0

    def snapshot(self, server_ids: Collection[str] | None) -> list[Event]:
        self.snapshots += 1
        return [e for e in self.events if server_ids is None or e.server_id in server_ids]

    def watch(self) -> Watch:
        return Watch(self.bus, self.snapshot)


async def take(updates: AsyncIterator[Update], count: int) -> list[Update]:
    async with asyncio.timeout(5):
        return [await anext(updates) for _ in range(count)]


def described(updates: list[Update]) -> list[tuple[int, str, str, int]]:
    out = []
    for u in updates:
        e = u.event
        if isinstance(e, Synced | CallerRevoked):
            out.append((u.sequence, type(e).__name__, "", 0))
        elif isinstance(e, TokenIssued):
            out.append((u.sequence, "token", e.server_id, e.token.version))
        else:
            out.append((u.sequence, type(e).__name__, e.server_id, 0))
    return out


async def test_snapshot_then_synced_then_changes_numbered_from_one() -> None:
    state = State(issued("a", 1), issued("b", 3))
    updates = state.watch().__aiter__()
    assert isinstance(updates, AsyncGenerator)
    first = await take(updates, 3)
    assert described(first) == [(1, "token", "a", 1), (2, "token", "b", 3), (3, "Synced", "", 0)]
    state.bus.publish(issued("a", 2))
    assert described(await take(updates, 1)) == [(4, "token", "a", 2)]
    await updates.aclose()
    assert state.bus.subscribers == 0


async def test_it_subscribes_before_the_snapshot_so_no_change_falls_between() -> None:
    state = State(issued("a", 1))
    watch = state.watch()
    original = state.snapshot

    def snapshot_during_which_a_change_arrives(ids: Collection[str] | None) -> list[Event]:
        events = original(ids)
        state.bus.publish(issued("a", 2))  # after the snapshot was read, before it was sent
        return events

    watch._snapshot = snapshot_during_which_a_change_arrives
    updates = aiter(watch)
    assert described(await take(updates, 3)) == [
        (1, "token", "a", 1),
        (2, "Synced", "", 0),
        (3, "token", "a", 2),
    ]


async def test_a_version_already_given_in_the_snapshot_is_not_given_again() -> None:
    state = State()
    watch = state.watch()
    original = state.snapshot

    def snapshot_that_already_has_v2(ids: Collection[str] | None) -> list[Event]:
        state.bus.publish(issued("a", 2))  # published while the snapshot is read...
        state.events = [issued("a", 2)]  # ...which therefore already holds it
        return original(ids)

    watch._snapshot = snapshot_that_already_has_v2
    updates = aiter(watch)
    assert described(await take(updates, 2)) == [(1, "token", "a", 2), (2, "Synced", "", 0)]
    state.bus.publish(issued("a", 1))  # older: dropped too
    state.bus.publish(issued("a", 3))
    assert described(await take(updates, 1)) == [(3, "token", "a", 3)]


async def test_a_busy_watcher_gets_only_the_newest_change_per_server() -> None:
    state = State()
    updates = aiter(state.watch())
    await take(updates, 1)  # synced
    for version in range(1, 50):
        state.bus.publish(issued("a", version))
    state.bus.publish(issued("b", 1))
    state.bus.publish(issued("a", 50))
    # In the order of each server's latest change.
    assert described(await take(updates, 2)) == [(2, "token", "b", 1), (3, "token", "a", 50)]


async def test_after_a_removal_the_same_version_counts_as_new() -> None:
    state = State(issued("a", 1))
    updates = aiter(state.watch())
    await take(updates, 2)
    state.bus.publish(ServerRemoved("a"))
    assert described(await take(updates, 1)) == [(3, "ServerRemoved", "a", 0)]
    state.bus.publish(TokenRevoked("b", 2))
    state.bus.publish(issued("a", 1))  # registered again: its versions start over
    assert described(await take(updates, 2)) == [
        (4, "TokenRevoked", "b", 0),
        (5, "token", "a", 1),
    ]


async def test_named_servers_and_allow_filter_the_snapshot_and_the_changes() -> None:
    state = State(issued("a", 1), issued("b", 1), issued("c", 1))
    updates = aiter(Watch(state.bus, state.snapshot, ["a", "b"], allow=lambda s: s != "b"))
    assert described(await take(updates, 2)) == [(1, "token", "a", 1), (2, "Synced", "", 0)]
    state.bus.publish(issued("b", 2))
    state.bus.publish(issued("c", 2))
    state.bus.publish(issued("a", 2))
    assert described(await take(updates, 1)) == [(3, "token", "a", 2)]


async def test_closing_the_bus_ends_the_watch() -> None:
    state = State(issued("a", 1))
    seen = [u async for u in _until_closed(state)]
    assert described(seen) == [(1, "token", "a", 1), (2, "Synced", "", 0)]
    assert state.snapshots == 1


async def _until_closed(state: State) -> AsyncIterator[Update]:
    async for update in state.watch():
        yield update
        if isinstance(update.event, Synced):
            state.bus.close()


async def test_a_revoked_owner_s_watch_ends_with_caller_revoked_and_others_go_on() -> None:
    state = State(issued("a", 1))
    revoked = Watch(state.bus, state.snapshot, owner="broker-1").__aiter__()
    other = Watch(state.bus, state.snapshot, owner="broker-2").__aiter__()
    await take(revoked, 2)
    await take(other, 2)
    state.bus.close_owner("broker-1")
    [last] = await take(revoked, 1)
    assert last.sequence == 3 and isinstance(last.event, CallerRevoked)
    assert [u async for u in revoked] == []
    state.bus.publish(issued("a", 2))
    assert described(await take(other, 1)) == [(3, "token", "a", 2)]
