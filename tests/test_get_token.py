"""GetToken over real gRPC against a real authorization server: caching, single
flight, compare-and-refresh, failures, revisions, restarts."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tokensvc.api import repeats
from tokensvc.api.convert import token_to_proto
from tokensvc.api.wire import TokenWire
from tokensvc.auth import Role
from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.errors import AuthorizationServerUnavailable
from tokensvc.store import create_engine, migrate
from tokensvc.store.engine import PG_MAX_OVERFLOW, PG_POOL_SIZE, PG_REFRESH_LOCKS
from tokensvc.token import ServerToken, Token
from tokensvc.v1 import tokensvc_pb2 as pb

from support import (
    CLIENT_ID,
    SECRET,
    CallContext,
    FakeClock,
    Harness,
    create_pg_database,
    drop_pg_database,
    error_info,
    eventually,
    rotate,
    running_service,
    sha,
)


@asynccontextmanager
async def on_a_fake_clock(
    tmp_path: Path, auth: AuthServer, lifetime: int | None = None
) -> AsyncIterator[tuple[Harness, FakeClock]]:
    """A service on a FakeClock, with "alpha" registered (its tokens living
    ``lifetime`` s, if given), and the clock."""
    clock = FakeClock()
    if lifetime is not None:
        auth.behaviour.lifetime = lifetime
    async with running_service(tmp_path, auth, clock=clock) as h:
        await h.register()
        yield h, clock


def get(server_id: str = "alpha", **fields: object) -> pb.GetTokenRequest:
    return pb.GetTokenRequest(server_id=server_id, **fields)  # type: ignore[arg-type]


async def test_a_token_is_fetched_once_and_then_served_from_memory(harness: Harness) -> None:
    await harness.register(scopes=["read"])
    first = await harness.tokens.GetToken(get())
    second = await harness.tokens.GetToken(get())
    assert first.access_token == second.access_token == harness.auth.issued[0]
    assert first.token_type == "Bearer" and list(first.scopes) == ["read"]
    assert first.version == 1 and first.server_id == "alpha"
    assert harness.auth.token_requests == 1
    # The wire: RFC 8707 resource defaults to the MCP URL.
    assert harness.auth.last_form["resource"] == "http://127.0.0.1:9/alpha/mcp"
    assert harness.auth.last_form["scope"] == "read"


async def test_500_concurrent_calls_on_a_cold_server_make_one_request(harness: Harness) -> None:
    gate = asyncio.Event()
    harness.auth.behaviour.gate = gate
    await harness.register()  # the scheduler's first fetch is held at the gate
    calls = [asyncio.ensure_future(harness.tokens.GetToken(get())) for _ in range(500)]
    # All 500 are waiting on the one request the authorization server holds.
    await harness.auth.wait_for_requests(1)
    gate.set()
    results = await asyncio.gather(*calls)
    assert harness.auth.token_requests == 1
    assert {r.access_token for r in results} == {harness.auth.issued[0]}


async def test_servers_in_flight_do_not_wait_for_each_other(harness: Harness) -> None:
    async with AuthServer() as other:
        other.add_client(CLIENT_ID, SECRET)
        harness.auth.behaviour.gate = asyncio.Event()
        await harness.register("slow")
        await harness.register("fast", token_endpoint=other.token_endpoint)
        slow = asyncio.ensure_future(harness.tokens.GetToken(get("slow")))
        fast = await asyncio.wait_for(harness.tokens.GetToken(get("fast")), timeout=30)
        assert fast.access_token == other.issued[0]
        assert not slow.done()
        harness.auth.behaviour.gate.set()
        assert (await slow).access_token == harness.auth.issued[0]


async def test_a_failure_reaches_every_waiter_and_is_not_cached(manual: Harness) -> None:
    harness = manual
    await harness.register()
    manager = harness.service.manager
    assert manager is not None
    gate = asyncio.Event()
    harness.auth.behaviour = Behaviour(gate=gate, fail_status=503)
    # In-process callers: all 50 have joined the flight before the request
    # even leaves, so the gate cannot open ahead of a late caller.
    calls = asyncio.gather(*(manager.get_token("alpha") for _ in range(50)), return_exceptions=True)
    await harness.auth.wait_for_requests(1)
    gate.set()
    results = await calls
    assert harness.auth.token_requests == 1
    assert all(isinstance(r, AuthorizationServerUnavailable) for r in results)
    assert len({id(r) for r in results}) == 1  # the one failure, shared
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.tokens.GetToken(get())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "AUTHORIZATION_SERVER_UNAVAILABLE"
    assert harness.auth.token_requests == 2  # not cached: the next call tried again
    harness.auth.behaviour = Behaviour()
    token = await harness.tokens.GetToken(get())
    assert harness.auth.token_requests == 3 and token.access_token == harness.auth.issued[-1]


async def test_refused_credentials_are_failed_precondition_with_the_servers_error(
    harness: Harness,
) -> None:
    await harness.register(secret="wrong-secret-value")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.tokens.GetToken(get())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "CREDENTIALS_REJECTED" and info.metadata["error"] == "invalid_client"
    assert "wrong-secret-value" not in str(caught.value) and "wrong-secret-value" not in str(info)
    status = (await harness.admin.GetServer(pb.GetServerRequest(id="alpha"))).status
    assert status.last_error.reason == "CREDENTIALS_REJECTED"
    assert status.last_error.error == "invalid_client"
    # A new secret clears the error and works.
    await harness.register()
    assert (await harness.tokens.GetToken(get())).version == 1
    status = (await harness.admin.GetServer(pb.GetServerRequest(id="alpha"))).status
    assert not status.HasField("last_error") and status.token_version == 1
    assert status.expires_at.seconds > 0 and status.last_fetch_time.seconds > 0


async def test_a_scope_the_client_may_not_have_is_token_request_rejected(harness: Harness) -> None:
    await harness.register(scopes=["admin"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.tokens.GetToken(get())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "TOKEN_REQUEST_REJECTED"
    assert error_info(caught.value).metadata["error"] == "invalid_scope"


async def test_fifty_reports_of_the_current_token_make_one_request(harness: Harness) -> None:
    await harness.register()
    current = await harness.tokens.GetToken(get())
    reports = await asyncio.gather(
        *(
            harness.tokens.GetToken(get(rejected_token_sha256=sha(current.access_token)))
            for _ in range(50)
        )
    )
    assert harness.auth.token_requests == 2
    assert {r.access_token for r in reports} == {harness.auth.issued[1]}
    assert {r.version for r in reports} == {2}
    # A late report of the older token changes nothing.
    late = await harness.tokens.GetToken(get(rejected_token_sha256=sha(current.access_token)))
    assert late.access_token == harness.auth.issued[1] and harness.auth.token_requests == 2


async def test_brokers_reporting_every_token_rejected_force_one_refresh_per_interval(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with on_a_fake_clock(tmp_path, auth) as (h, clock):
        first = await h.tokens.GetToken(get())

        async def broker(held: pb.Token) -> set[str]:
            """Reports every token it gets as rejected, as fast as it can."""
            seen = set()
            for _ in range(30):
                held = await h.tokens.GetToken(get(rejected_token_sha256=sha(held.access_token)))
                seen.add(held.access_token)
            return seen

        rounds = []
        for _ in range(3):
            rounds.append(await asyncio.gather(*(broker(first) for _ in range(5))))
            clock.advance(10)  # the interval (the default): one more forced refresh
        # 450 reports: the first token, then one forced refresh per interval.
        assert h.auth.token_requests == 1 + 3
        assert all(seen == {h.auth.issued[1]} for seen in rounds[0])
        status = (await h.admin.GetServer(pb.GetServerRequest(id="alpha"))).status
        assert status.rejected_versions == 3 and status.forced_refresh_time.seconds
        assert "keeps refusing this server's tokens" in status.warning
        # A token that lives to its scheduled refresh clears the warning.
        clock.advance(3600)
        await h.tokens.GetToken(get())
        status = (await h.admin.GetServer(pb.GetServerRequest(id="alpha"))).status
        assert (status.rejected_versions, status.warning) == (0, "")


async def test_a_token_near_expiry_is_replaced_and_min_valid_for_is_honoured(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with on_a_fake_clock(tmp_path, auth, lifetime=100) as (h, clock):
        first = await h.tokens.GetToken(get())
        clock.advance(40)  # 60 s left: fine by default (5 s)
        assert (await h.tokens.GetToken(get())).version == 1
        # Asking for more than half the lifetime is capped at half: still served.
        capped = await h.tokens.GetToken(get(min_valid_for=Duration(seconds=3600)))
        assert capped.version == 1
        clock.advance(50)  # 10 s left; a caller wanting 30 s gets a new token
        wanted = await h.tokens.GetToken(get(min_valid_for=Duration(seconds=30)))
        assert wanted.version == 2 and wanted.access_token != first.access_token
        assert auth.token_requests == 2


async def test_a_repeated_call_is_served_until_the_token_is_not_fresh_enough_for_it(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with on_a_fake_clock(tmp_path, auth, lifetime=100) as (h, clock):
        wanting = get(min_valid_for=Duration(seconds=30))
        assert (await h.tokens.GetToken(wanting)).version == 1
        clock.advance(70)  # exactly 30 s left: still enough, as the first call was told
        assert (await h.tokens.GetToken(wanting)).version == 1
        clock.advance(1)
        assert (await h.tokens.GetToken(wanting)).version == 2
        assert auth.token_requests == 2


async def test_a_repeated_call_gets_each_new_token_and_keeps_no_old_one_alive(
    harness: Harness,
) -> None:
    await harness.register()
    first = await harness.tokens.GetToken(get())
    assert await harness.tokens.GetToken(get()) == first
    # Held elsewhere for a while, as by an event on its way to a slow watcher.
    elsewhere = harness.service.manager.cached("alpha")
    old = weakref.ref(elsewhere)
    second = await rotate(harness, first)
    assert await harness.tokens.GetToken(get()) == second
    del elsewhere
    gc.collect()
    assert old() is None  # neither its answer nor its serialized response outlive it
    await harness.admin.DeleteServer(pb.DeleteServerRequest(id="alpha"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.tokens.GetToken(get())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_fifty_brokers_repeating_calls_through_rotations_never_get_an_older_token(
    harness: Harness,
) -> None:
    """Each call gets at least the token held when it was sent, however many
    repeats are answered from an earlier conclusion meanwhile."""
    harness.auth.behaviour.lifetime = 2  # a rotation about every second
    await harness.register()
    await harness.tokens.GetToken(get())
    served: list[tuple[int, int]] = []  # (version held when sent, version got)
    rotating = True

    async def broker() -> None:
        while rotating:
            floor = harness.service.manager.cached("alpha")
            assert floor is not None
            served.append((floor.version, (await harness.tokens.GetToken(get())).version))

    brokers = [asyncio.ensure_future(broker()) for _ in range(50)]
    try:
        await eventually(lambda: bool(served) and served[-1][1] >= 6)
    finally:
        rotating = False
        await asyncio.gather(*brokers)
    assert all(got >= floor for floor, got in served)
    assert {1, 2, 3, 4, 5, 6} <= {got for _, got in served}  # each token was served
    assert len(served) > 500  # many calls, through every rotation


async def test_at_most_max_remembered_conclusions_are_kept_the_oldest_going_first(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repeats, "MAX_REMEMBERED", 3)
    held = []
    for server_id in ("alpha", "beta", "gamma", "delta"):
        await harness.register(server_id)
        await harness.tokens.GetToken(get(server_id))
        token = harness.service.manager.cached(server_id)
        assert token is not None
        held.append(token)
    service = harness.service
    remembered = repeats.RepeatedCalls(service.manager, service.auth, service.clock)
    caller = await service.auth.require(CallContext("ipv4:127.0.0.1:1"), Role.BROKER)
    keys = [("", "peer", get(t.server_id).SerializeToString()) for t in held]
    for key, token in zip(keys, held, strict=True):
        remembered.remember(key, service.auth.generation, caller, token, timedelta(seconds=5))
    assert remembered.answer(keys[0]) is None  # the oldest went to make room
    assert [remembered.answer(key) for key in keys[1:]] == held[1:]


async def test_bytes_that_are_not_a_get_token_request_are_invalid_argument(
    harness: Harness,
) -> None:
    call = harness.channel.unary_unary("/tokensvc.v1.TokenService/GetToken")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\xff\xff\xff")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "request"


async def test_an_outage_serves_the_valid_token_until_it_expires_then_unavailable(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with on_a_fake_clock(tmp_path, auth, lifetime=100) as (h, clock):
        first = await h.tokens.GetToken(get())
        auth.behaviour.fail_status = 500
        clock.advance(97)  # 3 s left: a refresh is due, and fails
        served = await h.tokens.GetToken(get())
        assert served.access_token == first.access_token
        assert auth.token_requests == 2
        clock.advance(3)  # expired: never served
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.tokens.GetToken(get())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        status = (await h.admin.GetServer(pb.GetServerRequest(id="alpha"))).status
        assert status.last_error.reason == "AUTHORIZATION_SERVER_UNAVAILABLE"


async def test_a_fetch_under_an_older_registration_is_thrown_away(harness: Harness) -> None:
    gate = asyncio.Event()
    harness.auth.behaviour.gate = gate
    await harness.register()
    waiting = asyncio.ensure_future(harness.tokens.GetToken(get()))
    await harness.auth.wait_for_requests(1)
    # The admin rotates the secret while the old one's request is in flight.
    harness.auth.add_client(CLIENT_ID, "rotated-secret")
    updated = await harness.register(secret="rotated-secret")
    assert updated.revision == 2
    gate.set()
    served = await waiting
    assert harness.auth.token_requests >= 2
    assert served.access_token == harness.auth.issued[-1]
    assert served.access_token != harness.auth.issued[0]  # the old secret's token
    again = await harness.tokens.GetToken(get())
    assert again.access_token != harness.auth.issued[0]


async def test_a_restart_serves_the_stored_token_without_a_new_request(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with running_service(tmp_path, auth) as h:
        await h.register()
        before = await h.tokens.GetToken(get())
    async with running_service(tmp_path, auth) as h:
        after = await h.tokens.GetToken(get())
    assert after.access_token == before.access_token and after.version == before.version
    assert auth.token_requests == 1


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"server_id": "Bad Id"}, "server_id"),
        ({"server_id": "alpha", "rejected_token_sha256": "abc"}, "rejected_token_sha256"),
        ({"server_id": "alpha", "min_valid_for": Duration(seconds=-1)}, "min_valid_for"),
        ({"server_id": "alpha", "min_valid_for": Duration(seconds=90000)}, "min_valid_for"),
        ({"server_id": "alpha", "min_valid_for": Duration(seconds=2**62)}, "min_valid_for"),
        ({"server_id": "alpha", "min_valid_for": Duration(nanos=-5)}, "min_valid_for"),
    ],
)
async def test_bad_token_requests_name_the_field(
    harness: Harness, request_fields: dict[str, object], field: str
) -> None:
    await harness.register()
    await harness.tokens.GetToken(get())
    requests = harness.auth.token_requests
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.tokens.GetToken(pb.GetTokenRequest(**request_fields))  # type: ignore[arg-type]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == field
    assert harness.auth.token_requests == requests


async def test_a_caller_that_gives_up_does_not_cancel_the_fetch_for_others(
    harness: Harness,
) -> None:
    gate = asyncio.Event()
    harness.auth.behaviour.gate = gate
    await harness.register()
    impatient = harness.tokens.GetToken(get(), timeout=0.2)
    patient = asyncio.ensure_future(harness.tokens.GetToken(get()))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await impatient
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.set()
    assert (await patient).access_token == harness.auth.issued[0]
    assert harness.auth.token_requests == 1


def test_durations_are_checked_in_the_proto_layer() -> None:
    from tokensvc.api.convert import duration

    assert duration(Duration(), "f", timedelta(seconds=5)) == timedelta(seconds=5)
    assert duration(Duration(seconds=2), "f", timedelta(seconds=5)) == timedelta(seconds=2)


def held_token(version: int = 1, access_token: str = "at-1") -> ServerToken:
    issued = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    token = Token(access_token, "Bearer", issued, issued + timedelta(hours=1), ("read", "w"))
    return ServerToken("alpha", token, version, 1)


@pytest.mark.parametrize("sequence", [0, 1, 127, 128, 300, 2**40])
def test_responses_serialized_once_are_the_bytes_protobuf_would_make(sequence: int) -> None:
    wire, held = TokenWire(), held_token()
    assert wire.token(held) == token_to_proto(held).SerializeToString()
    expected = pb.TokenEvent(sequence=sequence, token=token_to_proto(held))
    assert pb.TokenEvent.FromString(wire.token_event(held, sequence)) == expected
    assert wire.token_event(held, sequence) == expected.SerializeToString()


def test_a_serialized_response_goes_with_its_token_and_a_new_one_is_not_the_old() -> None:
    wire, first = TokenWire(), held_token()
    assert pb.Token.FromString(wire.token(first)).access_token == "at-1"
    # A rotation: the new token is serialized anew; the old one, while held, is still itself.
    second = held_token(2, "at-2")
    assert pb.Token.FromString(wire.token(second)).access_token == "at-2"
    assert pb.Token.FromString(wire.token(first)).access_token == "at-1"
    del second
    assert len(wire) == 1
    del first  # nothing holds the token any more: its bytes are gone too
    assert len(wire) == 0


async def test_on_postgresql_more_token_requests_than_pooled_connections_do_not_starve_the_store(
    tmp_path: Path, auth: AuthServer, key_entry: str
) -> None:
    """Each token request holds a connection for its refresh lock: with more
    requests in flight than the pool has connections, the holders must still
    get connections to save what they fetched, and everything else to work."""
    servers = [f"s{i:02d}" for i in range(PG_POOL_SIZE + PG_MAX_OVERFLOW + 10)]
    url = await create_pg_database()
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine)
        gate = asyncio.Event()
        auth.behaviour.gate = gate  # every token request waits, holding its lock
        async with running_service(
            tmp_path, auth, database_url=url, keys=key_entry, fetch_concurrency=len(servers)
        ) as h:
            for sid in servers:
                await h.register(sid)
            gets = [
                asyncio.ensure_future(h.tokens.GetToken(get(sid), timeout=60)) for sid in servers
            ]
            await auth.wait_for_requests(PG_REFRESH_LOCKS)
            listed = await h.admin.ListServers(pb.ListServersRequest(), timeout=30)
            assert len(listed.servers) == len(servers)
            gate.set()
            tokens = await asyncio.gather(*gets)
        assert [t.server_id for t in tokens] == servers and all(t.version == 1 for t in tokens)
    finally:
        await engine.dispose()
        await drop_pg_database(url)
