"""The refresh schedule and the failure policy, driven by an injected clock:
the policy's arithmetic, then the manager against a real authorization server."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tokensvc.crypto import KeyRing, generate_key_entry
from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.egress import Egress
from tokensvc.errors import (
    AuthorizationServerUnavailable,
    CredentialsRejected,
    OAuthErrorFields,
)
from tokensvc.events import FetchFailed, Subscription, TokenIssued, TokenRevoked
from tokensvc.fallbacks import Fetch
from tokensvc.manager import TokenManager
from tokensvc.oauth import TokenFetcher
from tokensvc.policy import MIN_REFRESH_INTERVAL, RefreshPolicy
from tokensvc.registration import Credential, CredentialKind, ServerSpec
from tokensvc.registry import Registry
from tokensvc.scheduler import Scheduler
from tokensvc.store import Store, create_engine, migrate
from tokensvc.token import Secret, Token, utcnow

from support import CLIENT_ID, SECRET, FakeClock, RecordingNetwork

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("lifetime", "fraction", "jitter", "low", "high"),
    [
        (3600, 0.5, 0.05, 1620, 1980),  # half, give or take 5 % of the lifetime
        (3600, 0.8, 0.0, 2880, 2880),
        (4, 0.5, 0.05, 1.8, 2.2),  # short tokens work the same way
        (0.1, 0.5, 0.0, 0.1, 0.1),  # never later than expiry, even with the floor
        (1, 0.05, 0.2, 0.2, 0.25),  # never sooner than MIN_REFRESH_INTERVAL
    ],
)
def test_refresh_comes_at_a_jittered_fraction_of_the_lifetime_and_before_expiry(
    lifetime: float, fraction: float, jitter: float, low: float, high: float
) -> None:
    policy = RefreshPolicy(fraction=fraction, jitter=jitter)
    rng = random.Random(7)
    expires = T0 + timedelta(seconds=lifetime)
    for _ in range(500):
        when = policy.refresh_at(T0, expires, rng)
        offset = (when - T0).total_seconds()
        assert low - 1e-6 <= offset <= high + 1e-6
        assert when <= expires
        assert when - T0 >= min(MIN_REFRESH_INTERVAL, expires - T0)


def test_jitter_spreads_tokens_issued_together() -> None:
    policy = RefreshPolicy()
    rng = random.Random(1)
    times = {policy.refresh_at(T0, T0 + timedelta(hours=1), rng) for _ in range(100)}
    assert len(times) > 90


def test_a_tokens_replacement_time_is_drawn_from_the_token_alone() -> None:
    # Every replica, and this one after a restart, picks the same time for a
    # token; tokens issued together still spread over the whole jitter.
    lifetime = timedelta(seconds=100)
    tokens = [Token(f"token-{i}", "Bearer", T0, T0 + lifetime) for i in range(300)]
    offsets = [(RefreshPolicy().replace_at(t) - T0) / lifetime for t in tokens]
    assert offsets == [(RefreshPolicy().replace_at(t) - T0) / lifetime for t in tokens]
    assert all(0.45 <= offset < 0.55 for offset in offsets)
    assert min(offsets) < 0.46 and max(offsets) > 0.54 and len(set(offsets)) == len(tokens)


def test_a_per_server_fraction_overrides_the_default() -> None:
    policy = RefreshPolicy(jitter=0)
    when = policy.refresh_at(T0, T0 + timedelta(seconds=100), random.Random(), fraction=0.9)
    assert when == T0 + timedelta(seconds=90)


def test_transient_backoff_is_full_jitter_under_a_cap_and_honours_retry_after() -> None:
    policy = RefreshPolicy()
    rng = random.Random(3)
    error = AuthorizationServerUnavailable("down")
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (40, 30)]:
        delays = [policy.retry_in(error, failures, rng).total_seconds() for _ in range(300)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > ceiling * 0.8  # it does use the range
    slow_down = AuthorizationServerUnavailable("429", retry_after=120)
    assert policy.retry_in(slow_down, 1, rng) >= timedelta(seconds=120)


async def test_the_scheduler_sleeps_through_later_times_and_wakes_for_an_earlier_one() -> None:
    """The loop sleeps until the earliest due time; a later schedule (every
    refresh makes one) leaves it asleep, an earlier one wakes it at once."""
    ran: list[str] = []
    woke = asyncio.Event()

    async def run(key: str) -> None:
        ran.append(key)
        woke.set()

    scheduler = Scheduler(run, utcnow)
    scheduler.start()
    try:
        now = utcnow()
        scheduler.schedule("in-an-hour", now + timedelta(hours=1))
        await asyncio.sleep(0)  # the loop is now asleep until then
        scheduler.schedule("in-two-hours", now + timedelta(hours=2))
        assert not scheduler._wake.is_set()  # a later time does not wake it
        scheduler.schedule("in-an-hour", now)  # moved earlier: wakes it
        async with asyncio.timeout(30):
            await woke.wait()
        assert ran == ["in-an-hour"]
        assert scheduler.due_at("in-two-hours") == now + timedelta(hours=2)
    finally:
        await scheduler.stop()


async def test_one_wake_up_runs_the_keys_due_within_the_gather_window_but_no_retry_early() -> None:
    now = utcnow()
    ran: list[str] = []
    three = asyncio.Event()

    async def run(key: str) -> None:
        ran.append(key)
        if len(ran) == 3:
            three.set()

    scheduler = Scheduler(run, lambda: now, gather=timedelta(seconds=1))
    scheduler.schedule("due", now)
    scheduler.schedule("in-half-a-second", now + timedelta(milliseconds=500))
    # A retry keeps its time (a Retry-After is not to be run early).
    scheduler.schedule("retry-in-a-tenth", now + timedelta(milliseconds=100), early=False)
    scheduler.schedule("retry-in-a-tenth", now + timedelta(milliseconds=600))  # moved: may
    scheduler.schedule("retry-in-0.7-s", now + timedelta(milliseconds=700), early=False)
    scheduler.schedule("in-an-hour", now + timedelta(hours=1))
    scheduler.start()
    try:
        async with asyncio.timeout(30):
            await three.wait()  # all in the first wake-up: the clock never moves
        assert sorted(ran) == ["due", "in-half-a-second", "retry-in-a-tenth"]
        assert scheduler.due_at("retry-in-0.7-s") == now + timedelta(milliseconds=700)
        assert scheduler.due_at("in-an-hour") == now + timedelta(hours=1)
    finally:
        await scheduler.stop()


def test_a_refused_credential_waits_much_longer_and_never_retries_at_once() -> None:
    policy = RefreshPolicy()
    rng = random.Random(5)
    refused = CredentialsRejected("no", OAuthErrorFields("invalid_client"))
    first = [policy.retry_in(refused, 1, rng) for _ in range(200)]
    assert min(first) >= timedelta(seconds=30) and max(first) <= timedelta(seconds=60)
    assert policy.retry_in(refused, 50, rng) <= timedelta(hours=1)


# --- the manager on a fake clock -------------------------------------------------


class World:
    """A manager over a real store and a real authorization server, on a fake clock."""

    def __init__(
        self,
        store: Store,
        fetch: Fetch,
        egress: Egress,
        auth: AuthServer,
        clock: FakeClock,
        network: RecordingNetwork,
    ) -> None:
        self.store, self.fetch, self.auth, self.clock = store, fetch, auth, clock
        self.network = network  # under the fetcher: it can hold every answer
        self.manager = TokenManager(
            store, fetch, clock=clock, policy=RefreshPolicy(jitter=0), rng=random.Random(0)
        )
        self.registry = Registry(store, self.manager, egress, fetch)
        self.events: Subscription = self.manager.bus.subscribe()

    async def register(self, server_id: str = "alpha", secret: str = SECRET) -> None:
        spec = ServerSpec(
            id=server_id,
            mcp_url=f"http://127.0.0.1:9/{server_id}",
            token_endpoint=self.auth.token_endpoint,
            client_id=CLIENT_ID,
        )
        credential = Credential(CredentialKind.CLIENT_SECRET, Secret(secret))
        await self.registry.register(spec, credential, actor="test")

    async def tick(self, seconds: float) -> list[str]:
        self.clock.advance(seconds)
        return await self.manager.scheduler.run_due()

    def drain(self) -> list[object]:
        batch = list(self.events._pending.values())
        self.events._pending.clear()
        return batch


@pytest.fixture
async def world(tmp_path: Path, auth: AuthServer) -> AsyncIterator[World]:
    clock = FakeClock()
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    await migrate.upgrade(engine)
    store = Store(engine, KeyRing.parse(generate_key_entry()), clock)
    network = RecordingNetwork()
    egress = Egress(network=network)
    fetcher = TokenFetcher(egress, clock=clock)
    world = World(store, fetcher.fetch, egress, auth, clock, network)
    await world.manager.start(run_scheduler=False)
    auth.behaviour.lifetime = 100
    try:
        yield world
    finally:
        world.manager.bus.unsubscribe(world.events)
        await world.manager.stop()
        await fetcher.aclose()
        await store.close()


async def test_a_token_is_replaced_at_half_its_lifetime_and_watchers_are_told(world: World) -> None:
    await world.register()
    assert await world.tick(0) == ["alpha"]  # a new registration is fetched at once
    first = world.manager.cached("alpha")
    assert first is not None and first.version == 1
    assert [type(e) for e in world.drain()] == [TokenIssued]
    assert await world.tick(49) == []
    assert world.auth.token_requests == 1
    assert await world.tick(1) == ["alpha"]
    second = world.manager.cached("alpha")
    assert second is not None and second.version == 2
    assert second.token.expires_at > first.token.expires_at
    assert [e.token.version for e in world.drain() if isinstance(e, TokenIssued)] == [2]
    assert world.manager.scheduler.due_at("alpha") == world.clock.now + timedelta(seconds=50)


# "timeout": the network holds every answer and each read times out at once,
# so no real second passes however often the fetch is retried.
@pytest.mark.parametrize("outage", ["500", "timeout", "connection refused"])
async def test_an_outage_longer_than_half_a_lifetime_serves_the_valid_token_then_recovers(
    world: World, outage: str
) -> None:
    await world.register()
    await world.tick(0)
    first = world.manager.cached("alpha")
    assert first is not None
    port = int(world.auth.base_url.rsplit(":", 1)[1])
    if outage == "500":
        world.auth.behaviour.fail_status = 500
    elif outage == "timeout":
        world.network.stalled = True
    else:
        await world.auth.stop()
    await world.tick(50)  # due: fails
    failed = [e for e in world.drain() if isinstance(e, FetchFailed)]
    assert len(failed) == 1 and not failed[0].permanent
    assert failed[0].error.reason == "AUTHORIZATION_SERVER_UNAVAILABLE"
    assert failed[0].current_expires_at == first.token.expires_at
    # Retries back off, and the valid token keeps being served meanwhile.
    for _ in range(6):
        due = world.manager.scheduler.due_at("alpha")
        assert due is not None and due - world.clock.now <= timedelta(seconds=30)
        await world.tick((due - world.clock.now).total_seconds())
        if world.clock.now < first.token.expires_at - timedelta(seconds=10):
            assert (await world.manager.get_token("alpha")).version == 1
    assert len([e for e in world.drain() if isinstance(e, FetchFailed)]) >= 1
    if outage == "timeout":
        assert world.network.stalled_reads == 7  # the due fetch and its six retries
    back = AuthServer(port=port, behaviour=Behaviour(lifetime=100))
    if outage == "connection refused":
        await back.start()  # the authorization server comes back, on its old address
        back.add_client(CLIENT_ID, SECRET)
    else:
        world.auth.behaviour = Behaviour(lifetime=100)
        world.network.stalled = False
    try:
        due = world.manager.scheduler.due_at("alpha")
        assert due is not None and due - world.clock.now <= timedelta(seconds=30)
        await world.tick((due - world.clock.now).total_seconds())
        recovered = world.manager.cached("alpha")
        assert recovered is not None and recovered.version == 2
    finally:
        await back.stop()


async def test_a_token_past_expiry_is_never_served(world: World) -> None:
    await world.register()
    await world.tick(0)
    world.auth.behaviour.fail_status = 503
    world.clock.advance(100)
    with pytest.raises(AuthorizationServerUnavailable):
        await world.manager.get_token("alpha")


async def test_a_refused_credential_is_not_hammered_and_a_new_one_retries_at_once(
    world: World,
) -> None:
    await world.register(secret="not-the-secret")
    await world.tick(0)
    assert world.auth.token_requests == 1
    failed = [e for e in world.drain() if isinstance(e, FetchFailed)]
    assert failed and failed[0].permanent and failed[0].error.oauth.error == "invalid_client"
    # Brokers keep asking; the refusal is answered without a request.
    for _ in range(20):
        with pytest.raises(CredentialsRejected):
            await world.manager.get_token("alpha")
        await world.tick(1)
    assert world.auth.token_requests == 1
    # The admin fixes the secret: tried at once.
    await world.register(secret=SECRET)
    assert [type(e) for e in world.drain()] == [TokenRevoked]
    await world.tick(0)
    assert world.auth.token_requests == 2
    assert (await world.manager.get_token("alpha")).version == 1


async def test_a_restart_reschedules_stored_tokens_without_fetching(
    world: World, tmp_path: Path
) -> None:
    await world.register()
    await world.tick(0)
    fresh = TokenManager(world.store, world.fetch, clock=world.clock)
    await fresh.start(run_scheduler=False)
    try:
        held = fresh.cached("alpha")
        assert held is not None and held.version == 1
        due = fresh.scheduler.due_at("alpha")
        assert due is not None and world.clock.now < due < held.token.expires_at
    finally:
        await fresh.stop()
    assert world.auth.token_requests == 1


async def test_429_with_retry_after_is_honoured(world: World) -> None:
    await world.register()
    world.auth.behaviour = Behaviour(lifetime=100, fail_status=429, retry_after="90")
    await world.tick(0)
    due = world.manager.scheduler.due_at("alpha")
    assert due is not None and due - world.clock.now >= timedelta(seconds=90)
