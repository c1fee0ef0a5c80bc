"""ProtectedMCPServer end to end: the real AuthServer, the real MCP server and
the official MCP SDK client, over loopback HTTP.

Tokens are client_credentials tokens from ``AuthServer`` fetched with a plain
httpx2 POST; the MCP client carries them with an ``httpx2.Auth``, the way the
broker-side ``TokenAuth`` does.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from urllib.parse import quote

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR

from tokensvc.demo.authserver import AuthServer
from tokensvc.demo.mcpserver import ProtectedMCPServer

from support import CLIENT_ID, SECRET, Bearer, FakeClock, header_and_claims, mcp_initialize


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(real_until_moved=True)


@pytest.fixture
async def mcp_server(auth: AuthServer, clock: FakeClock) -> AsyncIterator[ProtectedMCPServer]:
    async with ProtectedMCPServer(
        issuer=auth.issuer, jwks_uri=auth.jwks_uri, clock=clock.timestamp
    ) as s:
        yield s


async def fetch_token(auth: AuthServer, resource: str, scope: str = "read") -> str:
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            auth.token_endpoint,
            data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
            # client_secret_basic form-encodes both before base64 (RFC 6749 2.3.1).
            auth=(quote(CLIENT_ID, safe=""), quote(SECRET, safe="")),
        )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


def assert_401(response: httpx2.Response, mcp_server: ProtectedMCPServer) -> None:
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="invalid_token"' in challenge
    assert f'resource_metadata="{mcp_server.resource_metadata_url}"' in challenge


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_valid_token_initialize_list_and_call_tools(
    auth: AuthServer, mcp_server: ProtectedMCPServer, mode: str
) -> None:
    """``mode="legacy"`` is the initialize handshake (2025-11-25, a session and its
    GET stream); ``"auto"`` probes ``server/discover`` and speaks 2026-07-28."""
    token = await fetch_token(auth, resource=mcp_server.url)
    assert header_and_claims(token)[1]["aud"] == mcp_server.url

    # The client call shape: an httpx2.AsyncClient carrying the Auth, handed to the
    # streamable HTTP transport, handed to Client. The caller owns the AsyncClient.
    async with (
        httpx2.AsyncClient(auth=Bearer(token)) as http,
        Client(streamable_http_client(mcp_server.url, http_client=http), mode=mode) as client,
    ):
        assert client.server_info is not None and client.server_info.name == "tokensvc-demo"
        tools = await client.list_tools()
        assert {"echo", "add", "whoami"} <= {tool.name for tool in tools.tools}

        before = mcp_server.accepted
        echoed = await client.call_tool("echo", {"text": "héllo"})
        assert mcp_server.accepted == before + 1  # one POST, its token verified
        assert echoed.structured_content == {"result": "héllo"}
        added = await client.call_tool("add", {"a": 2, "b": 0.5})
        assert added.structured_content == {"result": 2.5}
        who = await client.call_tool("whoami", {})
        assert who.structured_content == {
            "client_id": CLIENT_ID,
            "scopes": ["read"],
            "jti": header_and_claims(token)[1]["jti"],
        }

    assert mcp_server.tool_calls == 3
    assert mcp_server.accepted >= 4
    assert mcp_server.rejected == 0


async def test_token_expires_by_the_servers_clock(
    auth: AuthServer, mcp_server: ProtectedMCPServer, clock: FakeClock
) -> None:
    auth.behaviour.lifetime = 60
    token = await fetch_token(auth, resource=mcp_server.url)
    exp = header_and_claims(token)[1]["exp"]

    clock.now = datetime.fromtimestamp(exp - 0.5, UTC)
    assert (await mcp_initialize(mcp_server.url, token)).status_code == 200
    assert (mcp_server.accepted, mcp_server.rejected) == (1, 0)

    clock.now = datetime.fromtimestamp(exp + 1, UTC)  # past exp and the 1 s of leeway
    assert_401(await mcp_initialize(mcp_server.url, token), mcp_server)
    assert (mcp_server.accepted, mcp_server.rejected) == (1, 1)


async def test_token_for_another_resource_is_refused(
    auth: AuthServer, mcp_server: ProtectedMCPServer
) -> None:
    token = await fetch_token(auth, resource="http://127.0.0.1:9/other/mcp")
    assert_401(await mcp_initialize(mcp_server.url, token), mcp_server)
    assert (mcp_server.accepted, mcp_server.rejected) == (0, 1)


def _tampered(token: str) -> str:
    header, _, signature = token.split(".")
    claims = header_and_claims(token)[1] | {"scope": "read write admin"}
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{payload}.{signature}"


@pytest.mark.parametrize(
    "kind", ["missing", "garbage", "not-bearer", "tampered", "other-issuer-key"]
)
async def test_bad_token_is_answered_401(
    auth: AuthServer, mcp_server: ProtectedMCPServer, kind: str
) -> None:
    good = await fetch_token(auth, resource=mcp_server.url)
    authorization = None
    if kind == "garbage":
        authorization = "Bearer not.a.jwt"
    elif kind == "not-bearer":
        authorization = f"Basic {good}"
    elif kind == "tampered":
        authorization = f"Bearer {_tampered(good)}"
    elif kind == "other-issuer-key":
        # Signed by another server's key, with a kid this JWKS does not have.
        async with AuthServer() as other:
            other.add_client(CLIENT_ID, SECRET)
            authorization = f"Bearer {await fetch_token(other, resource=mcp_server.url)}"

    response = await mcp_initialize(mcp_server.url, authorization=authorization)

    assert_401(response, mcp_server)
    assert response.json()["error"] == "invalid_token"
    assert (mcp_server.accepted, mcp_server.rejected) == (0, 1)


async def test_wrong_issuer_is_refused(auth: AuthServer) -> None:
    """With the right key (a configured JWK) but another expected issuer."""
    good_issuer = ProtectedMCPServer(issuer=auth.issuer, jwk=auth.public_jwk)
    bad_issuer = ProtectedMCPServer(issuer="http://127.0.0.1:9/issuer", jwk=auth.public_jwk)
    async with good_issuer, bad_issuer:
        ok = await mcp_initialize(good_issuer.url, await fetch_token(auth, good_issuer.url))
        refused = await mcp_initialize(bad_issuer.url, await fetch_token(auth, bad_issuer.url))

    assert ok.status_code == 200
    assert_401(refused, bad_issuer)
    assert (bad_issuer.accepted, bad_issuer.rejected) == (0, 1)


async def test_protected_resource_metadata_names_the_issuer(
    auth: AuthServer, mcp_server: ProtectedMCPServer
) -> None:
    origin = mcp_server.url.removesuffix("/mcp")
    assert mcp_server.resource_metadata_url == origin + "/.well-known/oauth-protected-resource/mcp"
    async with httpx2.AsyncClient() as http:
        for url in (
            mcp_server.resource_metadata_url,
            origin + "/.well-known/oauth-protected-resource",
        ):
            response = await http.get(url)
            assert response.status_code == 200, url
            document = response.json()
            assert document["resource"] == mcp_server.url
            assert document["authorization_servers"] == [auth.issuer]  # exact: no trailing "/"
            assert document["bearer_methods_supported"] == ["header"]
    assert (mcp_server.accepted, mcp_server.rejected) == (0, 0)  # metadata needs no token


async def test_401_reaches_the_sdk_client_as_mcp_error(mcp_server: ProtectedMCPServer) -> None:
    """The SDK keeps no HTTP status: a 401 surfaces as ``MCPError(-32603, "Server
    returned an error response")``, wrapped in ``ExceptionGroup`` by the client's
    task groups when it happens while connecting. Only the ``httpx2.Auth`` sees
    the 401 itself (next test)."""
    with pytest.raises(ExceptionGroup) as raised:
        async with (
            httpx2.AsyncClient(auth=Bearer("garbage")) as http,
            Client(streamable_http_client(mcp_server.url, http_client=http), mode="legacy"),
        ):
            pass
    matched, _ = raised.value.split(MCPError)
    assert matched is not None
    errors = _leaves(matched)
    assert [error.error.code for error in errors] == [INTERNAL_ERROR]
    assert mcp_server.rejected == 1


async def test_auth_retrying_on_401_recovers_mid_session(
    auth: AuthServer, mcp_server: ProtectedMCPServer
) -> None:
    """The hook for a broker: the Auth sees the 401, gets a new token and resends,
    and the MCP session never notices."""

    class Refreshing(httpx2.Auth):
        def __init__(self, token: str) -> None:
            self.token, self.refreshes = token, 0

        async def async_auth_flow(
            self, request: httpx2.Request
        ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
            request.headers["Authorization"] = f"Bearer {self.token}"
            response = yield request
            if response.status_code == 401:
                self.refreshes += 1  # a broker reports the rejected token here
                self.token = await fetch_token(auth, resource=mcp_server.url)
                request.headers["Authorization"] = f"Bearer {self.token}"
                yield request

    refreshing = Refreshing(await fetch_token(auth, resource=mcp_server.url))
    async with (
        httpx2.AsyncClient(auth=refreshing) as http,
        Client(streamable_http_client(mcp_server.url, http_client=http), mode="legacy") as client,
    ):
        first = await client.call_tool("whoami", {})
        refreshing.token = await fetch_token(auth, resource="http://127.0.0.1:9/other/mcp")
        second = await client.call_tool("whoami", {})

    assert refreshing.refreshes == 1
    assert mcp_server.rejected == 1
    assert first.structured_content and second.structured_content
    assert first.structured_content["jti"] != second.structured_content["jti"]
    assert mcp_server.tool_calls == 2


def _leaves(group: BaseExceptionGroup[MCPError]) -> list[MCPError]:
    leaves: list[MCPError] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves
