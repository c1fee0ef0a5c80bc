"""WatchTokens under load, over real gRPC against a real authorization server: a
thousand watchers get every rotation in order while a stream that is never read
holds no one back and costs memory bounded by the number of servers; a slow
reader skips to the newest token; and the EventBus on its own."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import grpc
import pytest

from tokensvc.demo.authserver import AuthServer
from tokensvc.events import (
    EventBus,
    FetchFailed,
    ServerRemoved,
    Subscription,
    TokenIssued,
    TokenRevoked,
)
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

from support import Harness, rotate, running_service

TIMEOUT = 60.0  # seconds; generous: the machine may be small and busy
SERVERS = [f"srv-{i:03d}" for i in range(100)]
WATCHERS = 999
CHANNELS = 10
# A client that reads nothing still lets gRPC buffer a lot for it: with the
# default channel arguments, hundreds of rotations (hundreds of KB) fit in the
# HTTP/2 windows before tokensvc's write blocks and its per-server coalescing
# has anything to do. These arguments shrink the stream's window to ~1 KB (one
# or two tokens), so that a stream that is not read is truly stuck.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]


@pytest.fixture
async def harness(tmp_path: Path, auth: AuthServer) -> AsyncIterator[Harness]:
    """Rotations back to back: no interval between refreshes forced by reports."""
    async with running_service(tmp_path / "data", auth, min_forced_refresh_interval=0) as h:
        yield h


async def register_with_tokens(harness: Harness, server_ids: list[str]) -> list[pb.Token]:
    """Registers the servers and waits for the scheduler to fetch their first
    tokens, then reads them with GetToken (served from memory). Calling GetToken
    while those first fetches are still queued could start a second fetch for
    the same server, and an unexpected rotation would spoil the counts below."""
    manager = harness.service.manager
    assert manager is not None
    subscription = manager.bus.subscribe(server_ids)
    try:
        for server_id in server_ids:
            await harness.register(server_id)
        issued: set[str] = set()
        async with asyncio.timeout(TIMEOUT):
            while issued != set(server_ids):
                for event in await subscription.next_batch():
                    assert not isinstance(event, FetchFailed), event
                    if isinstance(event, TokenIssued):
                        issued.add(event.server_id)
    finally:
        manager.bus.unsubscribe(subscription)
    tokens = [
        await harness.tokens.GetToken(pb.GetTokenRequest(server_id=s), timeout=TIMEOUT)
        for s in server_ids
    ]
    assert [t.version for t in tokens] == [1] * len(server_ids)
    assert harness.auth.token_requests == len(server_ids)
    return tokens


def on_empty(bus: EventBus, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set once the last stream has unsubscribed: a stream's end on
    the server's side offers nothing else to await."""
    emptied = asyncio.Event()
    unsubscribe = bus.unsubscribe

    def unsubscribing(subscription: Subscription) -> None:
        unsubscribe(subscription)
        if bus.subscribers == 0:
            emptied.set()

    monkeypatch.setattr(bus, "unsubscribe", unsubscribing)
    return emptied


class Tally:
    """Counts readers per milestone (a token version, or "synced") and wakes
    whoever waits for all of them; a reader that fails wakes them too."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.counts: Counter[Hashable] = Counter()
        self.reached: dict[Hashable, asyncio.Event] = {}
        self.broken = asyncio.Event()
        self.failures: list[BaseException] = []

    def _event(self, key: Hashable) -> asyncio.Event:
        return self.reached.setdefault(key, asyncio.Event())

    def mark(self, key: Hashable) -> None:
        self.counts[key] += 1
        if self.counts[key] == self.expected:
            self._event(key).set()

    def fail(self, exc: BaseException) -> None:
        self.failures.append(exc)
        self.broken.set()

    async def wait(self, key: Hashable) -> None:
        reached = asyncio.ensure_future(self._event(key).wait())
        broken = asyncio.ensure_future(self.broken.wait())
        try:
            await asyncio.wait({reached, broken}, timeout=TIMEOUT, return_when="FIRST_COMPLETED")
        finally:
            reached.cancel()
            broken.cancel()
        assert not self.failures, f"a reader failed: {self.failures[0]!r}"
        assert self._event(key).is_set(), (
            f"{key!r}: {self.counts[key]} of {self.expected} readers within {TIMEOUT} s"
        )


@dataclass
class Reader:
    """Reads one WatchTokens stream to its end, noting when each version arrived."""

    call: grpc.aio.UnaryStreamCall
    tally: Tally
    sequences: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    arrivals: dict[int, float] = field(default_factory=dict)

    async def run(self) -> None:
        try:
            async for event in self.call:
                now = time.monotonic()
                self.sequences.append(event.sequence)
                kind = event.WhichOneof("event")
                self.kinds.append(kind)
                if kind == "token":
                    self.versions.append(event.token.version)
                    self.arrivals[event.token.version] = now
                    self.tally.mark(event.token.version)
                elif kind == "synced":
                    self.tally.mark("synced")
        except asyncio.CancelledError:
            if not self.call.cancelled():
                raise
        except BaseException as exc:
            if not self.call.cancelled():
                self.tally.fail(exc)
                raise


async def test_a_thousand_watchers_get_every_rotation_and_a_stuck_one_holds_no_one_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = harness.service.manager
    assert manager is not None
    bus = manager.bus
    tokens = await register_with_tokens(harness, SERVERS)
    emptied = on_empty(bus, monkeypatch)
    current = tokens[0]
    assert current.server_id == "srv-000"

    stuck_channel = grpc.aio.insecure_channel(harness.target, options=SMALL_WINDOW)
    reader_channels = [grpc.aio.insecure_channel(harness.target) for _ in range(CHANNELS)]
    # Watches every server and is never read: its snapshot alone (100 tokens)
    # overflows its window, so tokensvc's writer for it blocks at once.
    stuck = pb_grpc.TokenServiceStub(stuck_channel).WatchTokens(pb.WatchTokensRequest())
    readers: list[Reader] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.wait_for(stuck.initial_metadata(), TIMEOUT)  # its stream is open
        assert bus.subscribers == 1
        (stuck_subscription,) = bus._subscriptions

        tally = Tally(WATCHERS)
        stubs = [pb_grpc.TokenServiceStub(c) for c in reader_channels]
        started = time.monotonic()
        for i in range(WATCHERS):
            call = stubs[i % CHANNELS].WatchTokens(pb.WatchTokensRequest(server_ids=["srv-000"]))
            readers.append(Reader(call, tally))
        tasks = [asyncio.create_task(r.run()) for r in readers]
        await tally.wait("synced")
        print(f"\n{WATCHERS} watchers synced in {time.monotonic() - started:.2f} s")
        assert tally.counts[current.version] == WATCHERS

        # Latency to the last of the watchers, from the rotating call's start and
        # from its return (tokensvc publishes before it answers, and this process
        # runs the service too: the watchers may all have it before the return).
        figures: dict[str, list[float]] = {
            "from the GetToken call": [],
            "from the GetToken return": [],
            "from the first watcher": [],
        }
        first_version = current.version
        for _ in range(5):
            called = time.monotonic()
            current = await rotate(harness, current)
            returned = time.monotonic()
            await tally.wait(current.version)
            arrivals = [r.arrivals[current.version] for r in readers]
            figures["from the GetToken call"].append(max(arrivals) - called)
            figures["from the GetToken return"].append(max(arrivals) - returned)
            figures["from the first watcher"].append(max(arrivals) - min(arrivals))
        for name, seconds in figures.items():
            ms = sorted(1000 * x for x in seconds)
            print(
                f"rotation -> last of {WATCHERS} watchers, {name}:"
                f" p50 {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms"
                f" (all: {[round(x) for x in ms]})"
            )
        assert max(figures["from the GetToken call"]) < 20

        expected_versions = list(range(first_version, current.version + 1))
        for reader in readers:
            assert reader.versions == expected_versions
            assert reader.kinds == ["token", "synced"] + ["token"] * 5
            assert reader.sequences == list(range(1, len(reader.sequences) + 1))

        # The stuck stream holds at most one pending event per server, the newest,
        # however much happens.
        assert bus.subscribers == WATCHERS + 1
        assert all(s.pending <= len(SERVERS) for s in bus._subscriptions)
        for _ in range(10):
            current = await rotate(harness, current)
        await tally.wait(current.version)
        assert all(s.pending <= len(SERVERS) for s in bus._subscriptions)
        assert stuck_subscription.pending == 1
        held = stuck_subscription._pending["srv-000"]
        assert isinstance(held, TokenIssued) and held.token.version == current.version
        # Every other server rotates too: one pending event each, still no more.
        others = await asyncio.gather(*(rotate(harness, token) for token in tokens[1:]))
        assert stuck_subscription.pending == len(SERVERS)
        assert all(s.pending <= len(SERVERS) for s in bus._subscriptions)
        assert {
            e.server_id: e.token.version
            for e in stuck_subscription._pending.values()
            if isinstance(e, TokenIssued)
        } == {t.server_id: t.version for t in [current, *others]}
        # Those ten rotations were not awaited one by one: a watcher may have
        # skipped some, but never goes back, never misses the newest, and its
        # sequence has no gaps.
        for reader in readers:
            assert reader.versions[: len(expected_versions)] == expected_versions
            assert reader.versions[-1] == current.version
            assert all(a < b for a, b in pairwise(reader.versions))
            assert reader.sequences == list(range(1, len(reader.sequences) + 1))
    finally:
        for reader in readers:
            reader.call.cancel()
        stuck.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=TIMEOUT)
            assert not pending
        for channel in (stuck_channel, *reader_channels):
            await channel.close()
    # Cancelled streams unsubscribe on the server's side, which offers nothing to await.
    await asyncio.wait_for(emptied.wait(), TIMEOUT)
    assert bus.subscribers == 0


async def test_a_slow_reader_skips_to_the_newest_token(harness: Harness) -> None:
    (current,) = await register_with_tokens(harness, ["alpha"])
    # A small window (see SMALL_WINDOW): with the default one, gRPC alone would
    # buffer all twenty rotations for this reader.
    channel = grpc.aio.insecure_channel(harness.target, options=SMALL_WINDOW)
    call = pb_grpc.TokenServiceStub(channel).WatchTokens(
        pb.WatchTokensRequest(server_ids=["alpha"])
    )
    try:
        first = await asyncio.wait_for(call.read(), TIMEOUT)
        assert first.token.version == current.version and first.sequence == 1
        synced = await asyncio.wait_for(call.read(), TIMEOUT)
        assert synced.HasField("synced") and synced.sequence == 2
        # The reader pauses while the token rotates twenty times.
        for _ in range(20):
            current = await rotate(harness, current)
        started = time.monotonic()
        after: list[pb.TokenEvent] = []
        while not after or after[-1].token.version != current.version:
            event = await asyncio.wait_for(call.read(), TIMEOUT)
            assert event is not grpc.aio.EOF
            after.append(event)
        elapsed = time.monotonic() - started
        print(
            f"\nafter the pause: {len(after)} messages, versions"
            f" {[e.token.version for e in after]}, in {1000 * elapsed:.0f} ms"
        )
        assert len(after) <= 5
        assert [e.sequence for e in after] == list(range(3, 3 + len(after)))
        versions = [e.token.version for e in after]
        assert versions == sorted(versions) and versions[-1] == current.version
        assert elapsed < 20
    finally:
        call.cancel()
        await channel.close()


async def test_the_bus_keeps_the_newest_event_per_server_and_filters_and_closes() -> None:
    bus = EventBus()
    idle = bus.subscribe()  # never reads
    some = bus.subscribe(["srv-001", "srv-007"])
    for i in range(10_000):
        bus.publish(TokenRevoked(f"srv-{i % 50:03d}", revision=i))
    assert bus.subscribers == 2
    assert idle.pending == 50 and some.pending == 2
    batch = await asyncio.wait_for(idle.next_batch(), TIMEOUT)
    # The newest event of each server, in the order of their latest change.
    assert batch == [TokenRevoked(f"srv-{i % 50:03d}", revision=i) for i in range(9950, 10_000)]
    assert idle.pending == 0
    assert await asyncio.wait_for(some.next_batch(), TIMEOUT) == [
        TokenRevoked("srv-001", revision=9951),
        TokenRevoked("srv-007", revision=9957),
    ]
    bus.publish(ServerRemoved("srv-002"))
    assert some.pending == 0 and idle.pending == 1

    # A reader waiting for events wakes with [] when its subscription closes.
    waiting = asyncio.ensure_future(some.next_batch())
    await asyncio.sleep(0)
    assert not waiting.done()
    bus.unsubscribe(some)
    assert await asyncio.wait_for(waiting, TIMEOUT) == []
    assert bus.subscribers == 1
    bus.publish(ServerRemoved("srv-001"))
    assert some.pending == 0

    # close() drops what is pending: next_batch() returns [] at once.
    assert idle.pending == 2
    idle.close()
    assert await asyncio.wait_for(idle.next_batch(), TIMEOUT) == []
    bus.close()
    assert bus.subscribers == 0
    late = bus.subscribe()
    assert late.closed and await asyncio.wait_for(late.next_batch(), TIMEOUT) == []
