"""Discovery over real loopback HTTP: from an issuer (RFC 8414 / OpenID) and
from the MCP server itself (RFC 9728), and the documents that must be refused."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tokensvc.demo.authserver import AuthServer
from tokensvc.demo.loopback import LoopbackServer
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.v1 import tokensvc_pb2 as pb

from support import (
    CLIENT_ID,
    SECRET,
    FakeClock,
    Harness,
    RecordingNetwork,
    ScriptedResolver,
    bearer_call,
    error_info,
    running_service,
    scripted_egress,
    sha,
)


class Documents(LoopbackServer):
    """Serves whatever a test puts in ``routes``: path → response maker."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Callable[[Request], Response]] = {}

    def build_app(self) -> ASGIApp:
        async def any_path(request: Request) -> Response:
            maker = self.routes.get(request.url.path)
            return maker(request) if maker else Response(status_code=404)

        return Starlette(routes=[Route("/{path:path}", any_path, methods=["GET", "POST"])])


@pytest.fixture
async def documents() -> AsyncIterator[Documents]:
    async with Documents() as server:
        yield server


async def discovered(harness: Harness, **fields: Any) -> pb.Server:
    """Registers "alpha" with no token endpoint: discovery is to find it."""
    return await harness.register(token_endpoint="", **fields)


async def test_an_issuer_alone_finds_the_token_endpoint(harness: Harness) -> None:
    server = await discovered(harness, mcp_url="http://127.0.0.1:9/mcp", issuer=harness.auth.issuer)
    assert server.discovery.token_endpoint == harness.auth.token_endpoint
    assert server.discovery.metadata_url.endswith("/.well-known/oauth-authorization-server")
    assert "client_secret_basic" in server.discovery.token_endpoint_auth_methods_supported
    assert server.effective_auth_method == pb.CLIENT_AUTH_METHOD_CLIENT_SECRET_BASIC
    token = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    assert token.access_token == harness.auth.issued[-1]


async def test_an_mcp_url_alone_is_followed_to_its_authorization_server_and_the_token_works(
    harness: Harness,
) -> None:
    async with ProtectedMCPServer(
        issuer=harness.auth.issuer, jwks_uri=harness.auth.jwks_uri
    ) as mcp:
        server = await discovered(harness, mcp_url=mcp.url)
        assert server.discovery.issuer == harness.auth.issuer
        assert server.discovery.resource_metadata_url == mcp.resource_metadata_url
        assert server.discovery.token_endpoint == harness.auth.token_endpoint
        fetched = await harness.admin.GetServer(pb.GetServerRequest(id="alpha"))
        assert fetched.discovery == server.discovery  # stored, shown by GetServer
        token = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
        assert harness.auth.last_form["resource"] == mcp.url
        assert await bearer_call(mcp.url, token.access_token) == 200
        assert mcp.rejected >= 1  # the unauthenticated probe of discovery


@pytest.mark.parametrize(
    ("layout", "metadata_path"),
    [
        ("rfc8414-insert", "/.well-known/oauth-authorization-server/tenant"),
        ("oidc-insert", "/.well-known/openid-configuration/tenant"),
        ("oidc-append", "/tenant/.well-known/openid-configuration"),
    ],
)
async def test_every_metadata_location_of_an_issuer_with_a_path_is_tried(
    harness: Harness, documents: Documents, layout: str, metadata_path: str
) -> None:
    issuer = documents.base_url + "/tenant"
    documents.routes[metadata_path] = lambda _r: JSONResponse(
        {
            "issuer": issuer,
            "token_endpoint": harness.auth.token_endpoint,
            "token_endpoint_auth_methods_supported": ["client_secret_post"],
        }
    )
    server = await discovered(harness, mcp_url="http://127.0.0.1:9/mcp", issuer=issuer)
    assert server.discovery.metadata_url == documents.base_url + metadata_path
    # Only client_secret_post is offered, so it is chosen.
    assert server.effective_auth_method == pb.CLIENT_AUTH_METHOD_CLIENT_SECRET_POST
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    assert harness.auth.last_form.get("client_secret") == SECRET


BAD_DOCUMENTS: list[tuple[str, Callable[[Documents], Callable[[Request], Response]], str]] = [
    (
        "malformed",
        lambda d: lambda _r: Response("{not json", media_type="application/json"),
        "no JSON",
    ),
    (
        "huge",
        lambda d: lambda _r: Response("x" * 200_000, media_type="application/json"),
        "larger than",
    ),
    (
        "another issuer",
        lambda d: (
            lambda _r: JSONResponse({"issuer": "https://evil.example", "token_endpoint": "x"})
        ),
        "names issuer",
    ),
    (
        "metadata-address token endpoint",
        lambda d: (
            lambda _r: JSONResponse(
                {"issuer": d.base_url, "token_endpoint": "http://169.254.169.254/token"}
            )
        ),
        "metadata",
    ),
    (
        "http off loopback",
        lambda d: (
            lambda _r: JSONResponse(
                {"issuer": d.base_url, "token_endpoint": "http://192.0.2.10/token"}
            )
        ),
        "https",
    ),
    (
        "redirect to a metadata address",
        lambda d: lambda _r: RedirectResponse("http://169.254.169.254/latest/meta-data"),
        "metadata",
    ),
    (
        "redirect to the NAT64 form of a metadata address",
        lambda d: lambda _r: RedirectResponse("https://[64:ff9b::a9fe:a9fe]/latest/meta-data"),
        "metadata",
    ),
    (
        "redirect to Alibaba's metadata address",
        lambda d: lambda _r: RedirectResponse("https://100.100.100.200/latest/meta-data"),
        "metadata",
    ),
]


@pytest.mark.parametrize(("name", "make", "hint"), BAD_DOCUMENTS, ids=[b[0] for b in BAD_DOCUMENTS])
async def test_bad_discovery_documents_are_refused_clearly_and_nothing_is_stored(
    harness: Harness,
    documents: Documents,
    name: str,
    make: Callable[[Documents], Callable[[Request], Response]],
    hint: str,
) -> None:
    documents.routes["/.well-known/oauth-authorization-server"] = make(documents)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await discovered(harness, mcp_url="http://127.0.0.1:9/mcp", issuer=documents.base_url)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "server.issuer"
    assert hint in (caught.value.details() or ""), caught.value.details()
    page = await harness.admin.ListServers(pb.ListServersRequest())
    assert list(page.servers) == []


async def test_an_mcp_server_without_metadata_asks_for_an_issuer(
    harness: Harness, documents: Documents
) -> None:
    documents.routes["/mcp"] = lambda _r: Response(status_code=401)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await discovered(harness, mcp_url=documents.base_url + "/mcp")
    assert error_info(caught.value).metadata["field"] == "server.mcp_url"
    assert "give server.issuer or server.token_endpoint" in (caught.value.details() or "")


def test_documents_round_trip_through_json() -> None:
    from tokensvc.discovery import Discovery

    found = Discovery("https://as", "https://as/token", ("private_key_jwt",), "", "https://as/m")
    assert Discovery.from_json(found.to_json()) == found
    assert json.loads(found.to_json())["token_endpoint"] == "https://as/token"


async def test_the_auth_server_metadata_offers_what_tokensvc_uses(auth: AuthServer) -> None:
    answer = await _get_json(auth.issuer + "/.well-known/oauth-authorization-server")
    assert answer["token_endpoint"] == auth.token_endpoint


async def _get_json(url: str) -> dict[str, Any]:
    import httpx2

    async with httpx2.AsyncClient() as client:
        response = await client.get(url)
    return dict(response.json())


async def test_a_discovered_token_endpoint_that_stops_answering_is_looked_up_again(
    tmp_path: Path, auth: AuthServer, documents: Documents
) -> None:
    clock = FakeClock()
    metadata = {"issuer": documents.base_url, "token_endpoint": auth.token_endpoint}
    documents.routes["/.well-known/oauth-authorization-server"] = lambda _r: JSONResponse(metadata)
    async with (
        AuthServer() as moved,
        running_service(tmp_path, auth, clock=clock) as h,
    ):
        moved.add_client(CLIENT_ID, SECRET)
        await discovered(h, mcp_url="http://127.0.0.1:9/mcp", issuer=documents.base_url)
        first = await h.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
        await auth.stop()  # the old endpoint is gone...
        metadata["token_endpoint"] = moved.token_endpoint  # ...and the metadata says where to
        clock.advance(400)  # discovery is older than five minutes
        token = await h.tokens.GetToken(
            pb.GetTokenRequest(server_id="alpha", rejected_token_sha256=sha(first.access_token))
        )
        assert token.access_token == moved.issued[-1]
        server = await h.admin.GetServer(pb.GetServerRequest(id="alpha"))
        assert server.discovery.token_endpoint == moved.token_endpoint


@pytest.mark.parametrize(
    "target", ["http://[64:ff9b::a9fe:a9fe]/latest/meta-data", "http://100.100.100.200/latest"]
)
async def test_redirects_to_metadata_forms_are_refused_even_with_insecure_http_allowed(
    tmp_path: Path, auth: AuthServer, documents: Documents, target: str
) -> None:
    network = RecordingNetwork()
    egress = scripted_egress(ScriptedResolver(), network, allow_insecure_http=True)
    documents.routes["/.well-known/oauth-authorization-server"] = lambda _r: RedirectResponse(
        target
    )
    async with running_service(
        tmp_path / "data", auth, egress=egress, allow_insecure_http=True
    ) as harness:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await discovered(harness, mcp_url="http://127.0.0.1:9/mcp", issuer=documents.base_url)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "always refused" in (caught.value.details() or ""), caught.value.details()
    assert network.off_loopback == [] and network.connects  # the first hop was real
