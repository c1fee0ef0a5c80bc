"""The broker side, end to end: ``TokenClient`` and ``TokenAuth`` against a real
tokensvc over real gRPC sockets, the real ``AuthServer`` and, for ``TokenAuth``,
the real ``ProtectedMCPServer`` driven by the official MCP SDK client.

Nothing here sleeps to wait for something: tests await ``wait_synced()``, the
tokens ``on_token`` brings (``Arrivals``) or the authorization server's request
count, each under a generous timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tokensvc.client import SYNCED_MARGIN, BrokerToken, TokenAuth, TokenClient
from tokensvc.demo.authserver import AuthServer
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.token import utcnow
from tokensvc.v1 import tokensvc_pb2 as pb

from support import CLIENT_ID, FakeClock, Harness, header_and_claims, running_service

TIMEOUT = 30  # seconds; a generous bound on every wait
NEW_SECRET = "cs-rotated-Secret+%ü-2b9c"


@dataclass(frozen=True)
class Arrival:
    """One ``on_token(new, previous)`` call, with when it happened."""

    token: BrokerToken
    previous: BrokerToken | None
    at: datetime


class Arrivals:
    """An ``on_token`` callback that records every token the stream brings and
    lets a test await one."""

    def __init__(self) -> None:
        self.seen: list[Arrival] = []
        self._changed = asyncio.Event()

    def __call__(self, token: BrokerToken, previous: BrokerToken | None) -> None:
        self.seen.append(Arrival(token, previous, utcnow()))
        self._changed.set()

    async def wait_for(self, matches: Callable[[Arrival], bool], start: int = 0) -> Arrival:
        """The first arrival from index ``start`` on that ``matches``, once it has come."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                for arrival in self.seen[start:]:
                    if matches(arrival):
                        return arrival
                start = len(self.seen)
                self._changed.clear()
                await self._changed.wait()

    async def token_of(self, server_id: str, start: int = 0) -> BrokerToken:
        arrival = await self.wait_for(lambda a: a.token.server_id == server_id, start)
        return arrival.token


async def synced(client: TokenClient) -> None:
    async with asyncio.timeout(TIMEOUT):
        await client.wait_synced()


async def test_after_sync_get_token_answers_from_memory_even_with_tokensvc_stopped(
    tmp_path: Path, auth: AuthServer
) -> None:
    arrivals = Arrivals()
    async with running_service(tmp_path / "data", auth) as service:
        await service.register("alpha")
        async with TokenClient(service.target, ["alpha"], on_token=arrivals) as client:
            await synced(client)
            streamed = await arrivals.token_of("alpha")
            requests = auth.token_requests

            await service.service.stop(grace=1.0)  # no tokensvc to ask any more

            async with asyncio.timeout(TIMEOUT):
                for _ in range(3):
                    assert await client.get_token("alpha") == streamed
            assert streamed.expires_at - utcnow() > timedelta(minutes=30)
            assert auth.token_requests == requests
            # A call that needs a round trip (reporting the held token as
            # rejected) fails: the answers above came from memory.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async with asyncio.timeout(TIMEOUT):
                    await client.report_rejected("alpha", streamed.access_token)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_rotations_arrive_through_the_stream_while_the_previous_token_is_valid(
    harness: Harness, auth: AuthServer
) -> None:
    auth.behaviour.lifetime = 2  # refreshed at half its life: about every second
    await harness.register("alpha")
    arrivals = Arrivals()
    async with TokenClient(harness.target, ["alpha"], on_token=arrivals) as client:
        await synced(client)
        first = await arrivals.token_of("alpha")
        await arrivals.wait_for(lambda a: a.token.version >= first.version + 3)

        rotations = [a for a in arrivals.seen if a.token.version > first.version]
        margins = []
        for arrival in rotations:
            previous = arrival.previous
            assert previous is not None
            assert arrival.token.version > previous.version  # (a slow reader may skip some)
            assert arrival.token.access_token != previous.access_token
            assert arrival.token.expires_at > previous.expires_at
            margins.append((previous.expires_at - arrival.at).total_seconds())
        print(f"previous token still valid at each rotation's arrival for (s): {margins}")
        assert len(rotations) >= 3
        assert all(margin > 0 for margin in margins)
        assert client.rotations >= 3
        latest = rotations[-1].token
        held = await client.get_token("alpha", min_valid_for=timedelta(0))
        assert held.version >= latest.version


async def test_client_reconnects_by_itself_and_resyncs_after_tokensvc_restarts_on_the_same_port(
    tmp_path: Path, auth: AuthServer
) -> None:
    data_dir = tmp_path / "data"
    arrivals = Arrivals()
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_service(data_dir, auth))
        port = first.service.port
        await first.register("alpha")
        # Every server, including ones registered later; a short backoff cap
        # keeps the test quick (the default is 5 s).
        client = TokenClient(f"127.0.0.1:{port}", on_token=arrivals, reconnect_max=0.5)
        stack.push_async_callback(client.close)
        client.start()
        await synced(client)
        alpha = await arrivals.token_of("alpha")
        requests = auth.token_requests

        await first.service.stop(grace=1.0)  # the stream ends; tokensvc is gone
        assert client.cached("alpha") == alpha  # the client keeps what it holds

        second = await stack.enter_async_context(
            running_service(data_dir, auth, listen=f"127.0.0.1:{port}")  # same port, same database
        )
        restarted = time.monotonic()
        mark = len(arrivals.seen)
        await second.register("beta")
        beta = await arrivals.token_of("beta", start=mark)  # through the new stream
        print(f"resynced {time.monotonic() - restarted:.2f} s after tokensvc was back")

        assert client.reconnects >= 1
        assert client.cached("beta") == beta
        async with asyncio.timeout(TIMEOUT):
            assert await client.get_token("beta") == beta
            restored = await client.get_token("alpha")
            # More than the held token has left: a GetToken over the new connection
            # (tokensvc caps min_valid_for at half the lifetime, so it answers
            # from its cache).
            asked = await client.get_token("alpha", min_valid_for=timedelta(hours=2))
        # The new service has alpha's stored token: the restart fetched nothing.
        assert restored.access_token == asked.access_token == alpha.access_token
        assert auth.token_requests == requests + 1  # beta's token only


async def test_a_new_secret_revokes_the_held_token_and_deleting_the_server_drops_it(
    harness: Harness, auth: AuthServer
) -> None:
    await harness.register("alpha")
    await harness.register("beta")
    arrivals = Arrivals()
    async with TokenClient(harness.target, on_token=arrivals) as client:
        await synced(client)
        old = await arrivals.token_of("alpha")
        await arrivals.token_of("beta")

        # The authorization server now knows only the new secret, so a token
        # fetched from here on proves the new registration was used.
        auth.add_client(CLIENT_ID, NEW_SECRET)
        mark = len(arrivals.seen)
        started = time.monotonic()
        await harness.register("alpha", secret=NEW_SECRET)
        new = await arrivals.wait_for(lambda a: a.token.server_id == "alpha", start=mark)
        elapsed = time.monotonic() - started
        print(f"new token at the client {elapsed * 1000:.0f} ms after RegisterServer returned")

        assert new.token.access_token != old.access_token
        assert new.token.version > old.version
        assert new.previous is None  # `revoked` had dropped the old token before it came
        assert elapsed < 5
        async with asyncio.timeout(TIMEOUT):
            for _ in range(3):
                assert (await client.get_token("alpha")).access_token == new.token.access_token
        assert client.cached("alpha") == new.token
        assert old.access_token not in {a.token.access_token for a in arrivals.seen[mark:]}

        await harness.admin.DeleteServer(pb.DeleteServerRequest(id="alpha"))
        # A barrier on the same stream: a change to beta made after the delete
        # comes after the `removed` event (events leave in order of change).
        mark = len(arrivals.seen)
        await harness.register("beta", secret=NEW_SECRET)
        await arrivals.token_of("beta", start=mark)
        assert client.cached("alpha") is None
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with asyncio.timeout(TIMEOUT):
                await client.get_token("alpha")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_token_auth_sends_the_token_and_recovers_from_a_401_with_exactly_one_new_token(
    harness: Harness, auth: AuthServer
) -> None:
    """How the 401 is made deterministic: the first token lives 60 s; then the
    authorization server switches to 3600 s tokens and the MCP server's clock
    jumps 120 s ahead. For the MCP server the held token has expired, while
    tokensvc rightly still holds it as valid for about a minute (so only the
    reported rejection can make it fetch); the token it then fetches expires
    an hour from now, well past the MCP server's clock. Nothing depends on
    timing, and the injected clock only ever makes the MCP server stricter than
    the SDK's own check against real time."""
    auth.behaviour.lifetime = 60
    clock = FakeClock(real_until_moved=True)
    async with ProtectedMCPServer(
        issuer=auth.issuer, jwks_uri=auth.jwks_uri, clock=clock.timestamp
    ) as mcp:
        await harness.register("weather", mcp_url=mcp.url)  # resource, hence aud: the MCP URL
        arrivals = Arrivals()
        async with TokenClient(harness.target, ["weather"], on_token=arrivals) as tokens:
            await synced(tokens)
            first = await arrivals.token_of("weather")
            token_auth = TokenAuth(tokens, "weather")
            async with (
                asyncio.timeout(TIMEOUT),
                httpx2.AsyncClient(auth=token_auth) as http,
                Client(streamable_http_client(mcp.url, http_client=http), mode="legacy") as client,
            ):
                accepted = mcp.accepted
                who = await client.call_tool("whoami", {})
                assert who.structured_content is not None
                assert (
                    who.structured_content["jti"] == header_and_claims(first.access_token)[1]["jti"]
                )
                assert mcp.accepted > accepted
                assert (mcp.rejected, token_auth.retries) == (0, 0)

                requests = auth.token_requests
                auth.behaviour.lifetime = 3600
                clock.advance(120)  # `first` expired (exp + leeway) for the MCP server
                assert first.expires_at - utcnow() > timedelta(seconds=30)  # not for tokensvc
                who = await client.call_tool("whoami", {})

                assert mcp.rejected == 1
                assert token_auth.retries == 1
                assert auth.token_requests == requests + 1
                second = tokens.cached("weather")
                assert second is not None and second.version == first.version + 1
                assert who.structured_content is not None
                assert (
                    who.structured_content["jti"]
                    == header_and_claims(second.access_token)[1]["jti"]
                )
                assert who.structured_content["client_id"] == CLIENT_ID

                echoed = await client.call_tool("echo", {"text": "after the 401"})
                assert echoed.structured_content == {"result": "after the 401"}
                assert (mcp.rejected, token_auth.retries) == (1, 1)
                assert auth.token_requests == requests + 1
        assert mcp.tool_calls == 3


async def test_fifty_concurrent_reports_of_the_same_rejected_token_make_one_token_request(
    harness: Harness, auth: AuthServer
) -> None:
    await harness.register("alpha")
    async with (
        TokenClient(harness.target, ["alpha"]) as one,
        TokenClient(harness.target, ["alpha"]) as other,
    ):
        await synced(one)
        await synced(other)
        async with asyncio.timeout(TIMEOUT):
            rejected = await one.get_token("alpha")
            before = auth.token_requests
            gate = asyncio.Event()
            auth.behaviour.gate = gate  # hold the one new token request while reports pile up
            reports = [
                asyncio.ensure_future(client.report_rejected("alpha", rejected.access_token))
                for client in (one, other)
                for _ in range(25)
            ]
            await auth.wait_for_requests(before + 1)
            gate.set()
            results = await asyncio.gather(*reports)

    assert auth.token_requests == before + 1
    assert len(results) == 50
    assert {token.access_token for token in results} == {auth.issued[-1]}
    assert results[0].access_token != rejected.access_token
    assert {token.version for token in results} == {rejected.version + 1}


async def test_short_lived_tokens_are_served_from_memory_not_by_a_round_trip_each(
    harness: Harness, auth: AuthServer
) -> None:
    auth.behaviour.lifetime = 4  # shorter than the default min_valid_for of 5 s
    await harness.register("alpha")
    arrivals = Arrivals()
    async with TokenClient(harness.target, ["alpha"], on_token=arrivals) as client:
        await arrivals.token_of("alpha")
        for _ in range(50):
            assert (await client.get_token("alpha")).expires_at > utcnow()
        # While synced, the stream's token is trusted until its successor comes.
        assert client.round_trips == 0


async def test_a_failing_on_token_callback_does_not_stop_the_stream(
    harness: Harness, auth: AuthServer
) -> None:
    auth.behaviour.lifetime = 2
    await harness.register("alpha")
    seen: list[int] = []
    enough = asyncio.Event()

    def broken(new: BrokerToken, previous: BrokerToken | None) -> None:
        seen.append(new.version)
        if len(seen) >= 3:
            enough.set()
        raise RuntimeError("a broker bug")

    async with TokenClient(harness.target, ["alpha"], on_token=broken) as client:
        await asyncio.wait_for(enough.wait(), TIMEOUT)
        assert client.reconnects == 0 and seen == sorted(seen)


async def test_while_synced_the_pushed_token_is_used_until_the_margin_before_its_expiry(
    harness: Harness, auth: AuthServer
) -> None:
    # Long-lived tokens and the client's own fake clock: no rotation comes
    # while the test moves the client's time towards expiry.
    await harness.register("alpha")
    clock, arrivals = FakeClock(), Arrivals()
    async with TokenClient(harness.target, ["alpha"], clock=clock, on_token=arrivals) as client:
        held = await arrivals.token_of("alpha")
        await synced(client)
        # Past the default 5 s of validity (where the rule gives up), to the margin:
        for left in (5.0, 4.0, 2.0, SYNCED_MARGIN.total_seconds()):
            clock.now = held.expires_at - timedelta(seconds=left)
            assert await client.get_token("alpha") is held
        assert client.round_trips == 0
        clock.now = held.expires_at - SYNCED_MARGIN + timedelta(microseconds=1)
        await client.get_token("alpha")  # too close: ask tokensvc
        assert client.round_trips == 1
        # A caller that asks for a validity gets the rule of tokensvc.
        clock.now = held.expires_at - timedelta(seconds=4)
        await client.get_token("alpha", min_valid_for=timedelta(seconds=10))
        assert client.round_trips == 2


async def test_without_a_synced_stream_the_rule_of_tokensvc_applies(
    harness: Harness, auth: AuthServer
) -> None:
    await harness.register("alpha")
    clock = FakeClock()
    client = TokenClient(harness.target, ["alpha"], clock=clock)  # never started: no stream
    try:
        held = await client.get_token("alpha")
        clock.now = held.expires_at - timedelta(seconds=5)  # the default 5 s left: fresh
        assert await client.get_token("alpha") is held
        clock.now = held.expires_at - timedelta(seconds=4)
        await client.get_token("alpha")
        assert client.round_trips == 2
    finally:
        await client.close()
