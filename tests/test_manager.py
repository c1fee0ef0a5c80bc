"""TokenManager on its own: the real store, a fake clock, and a fetch that
counts how often it is asked (the network is the edge that is faked; every
count below is exact)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from tokensvc.crypto import KeyRing, generate_key_entry
from tokensvc.errors import AuthorizationServerUnavailable, CredentialsRejected
from tokensvc.manager import TokenManager
from tokensvc.policy import RefreshPolicy
from tokensvc.registration import Credential, CredentialKind, ServerSpec
from tokensvc.store import Store, create_engine, migrate
from tokensvc.token import DEFAULT_MIN_VALID_FOR, Clock, Secret, Token, fresh_enough, sha256_hex

from support import FakeClock, manager_over

LIFETIME = timedelta(seconds=100)


class CountingFetch:
    """A token endpoint that counts requests, can hold a server's at a gate
    (``held`` says once one waits there), and can fail."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.failure: Exception | None = None
        self._waiting: set[str] = set()
        self._arrived = asyncio.Condition()

    async def held(self, server_id: str) -> None:
        async with self._arrived:
            await self._arrived.wait_for(lambda: server_id in self._waiting)

    async def __call__(self, spec: ServerSpec, credential: Credential) -> Token:
        self.calls.append(spec.id)
        gate = self.gates.get(spec.id)
        if gate is not None:
            async with self._arrived:
                self._waiting.add(spec.id)
                self._arrived.notify_all()
            await gate.wait()
        if self.failure is not None:
            raise self.failure
        now = self.clock()
        return Token(f"{spec.id}-{len(self.calls)}", "Bearer", now, now + LIFETIME)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[TokenManager, CountingFetch, FakeClock]]:
    clock = FakeClock()
    fetch = CountingFetch(clock)
    options = {"policy": RefreshPolicy(jitter=0), "rng": random.Random(0)}
    async with manager_over(tmp_path, fetch, clock, ("alpha", "beta"), **options) as manager:
        yield manager, fetch, clock


async def test_manager_should_hit_the_network_once_for_300_callers_and_then_use_its_cache(
    world: tuple[TokenManager, CountingFetch, FakeClock],
) -> None:
    manager, fetch, _ = world
    gate = fetch.gates["alpha"] = asyncio.Event()
    callers = [asyncio.ensure_future(manager.get_token("alpha")) for _ in range(300)]
    await fetch.held("alpha")  # the one request is at the endpoint; every caller waits on it
    gate.set()
    tokens = await asyncio.gather(*callers)
    assert fetch.calls == ["alpha"]
    assert {t.token.access_token for t in tokens} == {"alpha-1"}
    again = await asyncio.gather(*(manager.get_token("alpha") for _ in range(300)))
    assert fetch.calls == ["alpha"]
    assert {t.version for t in again} == {1}


async def test_one_server_waiting_for_its_token_never_holds_up_another(
    world: tuple[TokenManager, CountingFetch, FakeClock],
) -> None:
    manager, fetch, _ = world
    fetch.gates["alpha"] = asyncio.Event()  # never set: alpha's endpoint hangs
    held = asyncio.ensure_future(manager.get_token("alpha"))
    await fetch.held("alpha")
    assert (await manager.get_token("beta")).token.access_token == "beta-2"
    assert not held.done()
    held.cancel()


async def test_a_caller_that_gives_up_does_not_cancel_the_fetch_the_others_wait_for(
    world: tuple[TokenManager, CountingFetch, FakeClock],
) -> None:
    manager, fetch, _ = world
    gate = fetch.gates["alpha"] = asyncio.Event()
    impatient = asyncio.ensure_future(manager.get_token("alpha"))
    patient = asyncio.ensure_future(manager.get_token("alpha"))
    await fetch.held("alpha")
    impatient.cancel()
    gate.set()
    assert (await patient).token.access_token == "alpha-1"
    assert fetch.calls == ["alpha"]


async def test_a_reported_token_is_replaced_once_however_many_brokers_report_it(
    world: tuple[TokenManager, CountingFetch, FakeClock],
) -> None:
    manager, fetch, _ = world
    current = await manager.get_token("alpha")
    rejected = sha256_hex(current.token.access_token)
    replaced = await asyncio.gather(
        *(manager.get_token("alpha", None, rejected) for _ in range(100))
    )
    assert fetch.calls == ["alpha", "alpha"]
    assert {t.version for t in replaced} == {2}
    # A report of the token already replaced gets the current one, no fetch.
    assert (await manager.get_token("alpha", None, rejected)).version == 2
    assert len(fetch.calls) == 2


async def test_a_transient_failure_is_never_cached(
    world: tuple[TokenManager, CountingFetch, FakeClock],
) -> None:
    manager, fetch, _ = world
    fetch.failure = AuthorizationServerUnavailable("down")
    for expected in (1, 2):
        with pytest.raises(AuthorizationServerUnavailable):
            await manager.get_token("alpha")
        assert len(fetch.calls) == expected
    fetch.failure = None
    assert (await manager.get_token("alpha")).token.access_token == "alpha-3"


async def test_a_refused_credential_is_answered_from_memory_until_its_backoff_ends(
    world: tuple[TokenManager, CountingFetch, FakeClock],
) -> None:
    manager, fetch, clock = world
    fetch.failure = CredentialsRejected("invalid_client")
    for _ in range(3):
        with pytest.raises(CredentialsRejected):
            await manager.get_token("alpha")
    assert len(fetch.calls) == 1  # not hammered
    clock.advance(3601)  # past the longest permanent backoff
    with pytest.raises(CredentialsRejected):
        await manager.get_token("alpha")
    assert len(fetch.calls) == 2


# A token issued at 0 s and expiring at 100 s, asked for at ``now`` with
# ``wanted``: fresh or not, down to the microsecond on either side of the edge.
US = timedelta(microseconds=1)
EDGES = [
    (timedelta(seconds=0), DEFAULT_MIN_VALID_FOR, True),
    (LIFETIME - DEFAULT_MIN_VALID_FOR, DEFAULT_MIN_VALID_FOR, True),  # exactly the leeway left
    (LIFETIME - DEFAULT_MIN_VALID_FOR + US, DEFAULT_MIN_VALID_FOR, False),
    (LIFETIME - US, timedelta(0), True),  # asking for nothing: valid until expiry
    (LIFETIME, timedelta(0), True),  # at expires_at, "valid for 0 s" still holds...
    (LIFETIME + US, timedelta(0), False),  # ...one microsecond later it does not
    (LIFETIME / 2, timedelta(seconds=80), True),  # more than half the lifetime counts as half
    (LIFETIME / 2 + US, timedelta(seconds=80), False),
    (timedelta(seconds=40), timedelta(seconds=50), True),
]


@pytest.mark.parametrize(("now", "wanted", "fresh"), EDGES)
def test_the_freshness_rule_at_its_edges(now: timedelta, wanted: timedelta, fresh: bool) -> None:
    issued = FakeClock().now
    assert fresh_enough(issued, issued + LIFETIME, wanted, issued + now) is fresh


@pytest.mark.parametrize(("now", "wanted", "fresh"), EDGES[:3] + EDGES[6:8])
async def test_the_manager_fetches_exactly_when_the_rule_says_the_token_will_not_do(
    world: tuple[TokenManager, CountingFetch, FakeClock],
    now: timedelta,
    wanted: timedelta,
    fresh: bool,
) -> None:
    manager, fetch, clock = world
    first = await manager.get_token("alpha")
    clock.now = first.token.issued_at + now
    held = await manager.get_token("alpha", wanted)
    assert len(fetch.calls) == (1 if fresh else 2)
    assert held.version == (1 if fresh else 2)


async def test_a_get_token_for_a_server_queued_behind_the_schedule_does_not_wait_for_a_slot(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    await migrate.upgrade(engine)
    store = Store(engine, KeyRing.parse(generate_key_entry()), clock)
    fetch = CountingFetch(clock)
    manager = TokenManager(store, fetch, clock=clock, fetch_concurrency=1)
    await manager.start()  # the scheduler runs: one first fetch at a time
    gate = fetch.gates["alpha"] = asyncio.Event()
    try:
        for server_id in ("alpha", "beta"):
            spec = ServerSpec(server_id, f"https://{server_id}.example/mcp", "https://as/t", "c")
            credential = Credential(CredentialKind.CLIENT_SECRET, Secret("s"))
            result = await store.register(spec, credential)
            manager.registered(result.record, result.revised)
            if server_id == "alpha":
                await fetch.held("alpha")  # alpha's first fetch holds the only slot
        # beta's first fetch is queued behind alpha's, which never ends: a
        # caller of beta starts it at once rather than wait for the slot.
        held = await asyncio.wait_for(manager.get_token("beta"), 10)
        assert held.token.access_token == "beta-2"
        assert fetch.calls == ["alpha", "beta"]
    finally:
        gate.set()
        await manager.stop()
        await store.close()
