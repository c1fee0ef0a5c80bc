"""Secretless credentials end to end: a platform-issued JWT, projected into a
directory the way the kubelet does it, is the only credential tokensvc holds.
The in-process authorization server trusts the platform issuer (as Entra ID's
workload identity federation, or an SEP-1933 authorization server, does) and an
MCP server built with the official SDK accepts the tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tokensvc.assertions import AssertionDir
from tokensvc.demo.authserver import JWT_BEARER, AuthServer
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.errors import CredentialUnavailable
from tokensvc.oauth import TokenFetcher
from tokensvc.registration import Credential, CredentialKind, GrantType, ServerSpec
from tokensvc.token import Secret
from tokensvc.v1 import tokensvc_pb2 as pb

from support import Harness, bearer_call, error_info, running_service
from workload import PLATFORM_ISSUER, SUBJECT, PlatformIssuer, ProjectedVolume

AUDIENCE = "api://tokensvc-federation"  # what the authorization server expects in aud
CLIENT = "workload-client"


@pytest.fixture(scope="module")
def platform() -> PlatformIssuer:
    return PlatformIssuer()


@pytest.fixture
def federating(auth: AuthServer, platform: PlatformIssuer) -> AuthServer:
    """The authorization server, trusting the platform's JWTs for CLIENT."""
    auth.trust_platform(PLATFORM_ISSUER, platform.jwks, AUDIENCE)
    auth.add_federated_client(CLIENT, PLATFORM_ISSUER, SUBJECT, scopes=("read",))
    return auth


@pytest.fixture
def volume(tmp_path: Path, platform: PlatformIssuer) -> ProjectedVolume:
    projected = ProjectedVolume(tmp_path / "projected")
    projected.write(platform.issue(AUDIENCE))
    return projected


@pytest.fixture
async def service(
    tmp_path: Path, federating: AuthServer, volume: ProjectedVolume
) -> AsyncIterator[Harness]:
    async with running_service(
        tmp_path / "data", federating, assertion_dir=volume.root, run_scheduler=False
    ) as harness:
        yield harness


def spec(auth: AuthServer, **fields: object) -> ServerSpec:
    values: dict[str, object] = {
        "id": "wl",
        "mcp_url": "http://127.0.0.1:9/mcp",
        "token_endpoint": auth.token_endpoint,
        "client_id": CLIENT,
        "scopes": ("read",),
    }
    values.update(fields)
    return ServerSpec(**values)  # type: ignore[arg-type]


ASSERTION_FILE = Credential(CredentialKind.ASSERTION_FILE, Secret("token"))


async def test_a_federated_assertion_is_sent_as_client_assertion_and_each_rotation_is_used(
    federating: AuthServer, volume: ProjectedVolume, platform: PlatformIssuer
) -> None:
    fetcher = TokenFetcher(assertions=AssertionDir(volume.root))
    try:
        first = (volume.root / "token").read_text()
        await fetcher.fetch(spec(federating), ASSERTION_FILE)
        form = federating.last_form
        assert form["client_assertion"] == first
        assert form["client_id"] == CLIENT
        assert form["grant_type"] == "client_credentials"
        assert "client_secret" not in form
        assert "authorization" not in federating.last_headers

        volume.write(second := platform.issue(AUDIENCE))  # the kubelet rotates it
        await fetcher.fetch(spec(federating), ASSERTION_FILE)
        assert federating.last_form["client_assertion"] == second
    finally:
        await fetcher.aclose()


async def test_the_jwt_bearer_grant_sends_the_assertion_as_the_grant_with_no_client_auth(
    federating: AuthServer, volume: ProjectedVolume
) -> None:
    fetcher = TokenFetcher(assertions=AssertionDir(volume.root))
    try:
        bearer = spec(federating, client_id="", grant_type=GrantType.JWT_BEARER)
        token = await fetcher.fetch(bearer, ASSERTION_FILE)
    finally:
        await fetcher.aclose()
    form = federating.last_form
    assert form["grant_type"] == JWT_BEARER
    assert form["assertion"] == (volume.root / "token").read_text()
    assert form["resource"] == "http://127.0.0.1:9/mcp"
    assert form["scope"] == "read"
    assert not {"client_id", "client_secret", "client_assertion"} & form.keys()
    assert token.scopes == ("read",)


async def test_an_expired_assertion_gives_a_clear_error_and_no_request(
    federating: AuthServer, volume: ProjectedVolume, platform: PlatformIssuer
) -> None:
    volume.write(expired := platform.issue(AUDIENCE, lifetime=-60))
    fetcher = TokenFetcher(assertions=AssertionDir(volume.root))
    try:
        with pytest.raises(CredentialUnavailable, match=r"expired at .*not renewed") as caught:
            await fetcher.fetch(spec(federating), ASSERTION_FILE)
    finally:
        await fetcher.aclose()
    assert federating.token_requests == 0
    assert expired not in str(caught.value)


async def test_an_assertion_from_an_untrusted_platform_is_refused_by_the_server(
    federating: AuthServer, volume: ProjectedVolume
) -> None:
    volume.write(PlatformIssuer().issue(AUDIENCE))  # same issuer name, another key
    fetcher = TokenFetcher(assertions=AssertionDir(volume.root))
    try:
        with pytest.raises(Exception, match="refused the client credentials"):
            await fetcher.fetch(spec(federating), ASSERTION_FILE)
    finally:
        await fetcher.aclose()


async def test_a_server_registered_with_only_an_assertion_file_serves_tokens_an_mcp_server_accepts(
    service: Harness, federating: AuthServer
) -> None:
    async with ProtectedMCPServer(
        issuer=federating.issuer, jwks_uri=federating.jwks_uri
    ) as mcp_server:
        for server_id, grant in (("fed", 0), ("bearer", pb.GRANT_TYPE_JWT_BEARER)):
            registered = await service.admin.RegisterServer(
                pb.RegisterServerRequest(
                    server=pb.Server(
                        id=server_id,
                        mcp_url=mcp_server.url,
                        token_endpoint=federating.token_endpoint,
                        client_id=CLIENT if not grant else "",
                        scopes=["read"],
                        grant_type=grant,
                    ),
                    assertion_file="token",
                )
            )
            assert registered.credential.kind == "assertion_file"
            assert registered.credential.assertion_file == "token"
            token = await service.tokens.GetToken(pb.GetTokenRequest(server_id=server_id))
            assert await bearer_call(mcp_server.url, token.access_token) == 200
        fed = await service.admin.GetServer(pb.GetServerRequest(id="fed"))
        assert fed.effective_auth_method == pb.CLIENT_AUTH_METHOD_FEDERATED_ASSERTION


@pytest.mark.parametrize(
    ("assertion_file", "says"),
    [
        ("../data/tokensvc.db", "without '..'"),
        ("/etc/hostname", "relative name"),
        ("missing", "does not exist"),
        ("escape", "resolves outside the assertion directory"),
    ],
)
async def test_registrations_naming_files_outside_the_directory_are_refused(
    service: Harness, volume: ProjectedVolume, tmp_path: Path, assertion_file: str, says: str
) -> None:
    (volume.root / "escape").symlink_to(tmp_path / "data" / "keys")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.register("wl", secret=None, assertion_file=assertion_file)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "assertion_file"
    assert says in (caught.value.details() or "")


async def test_without_an_assertion_dir_a_registration_is_refused_naming_the_setting(
    tmp_path: Path, federating: AuthServer
) -> None:
    async with running_service(tmp_path / "data", federating, run_scheduler=False) as h:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.register("wl", secret=None, assertion_file="token")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "--assertion-dir" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"auth_method": pb.CLIENT_AUTH_METHOD_CLIENT_SECRET_BASIC}, "assertion_file", "needs"),
        ({"grant_type": pb.GRANT_TYPE_JWT_BEARER, "auth_method": 1}, "server.auth_method", "unset"),
        ({"auth_method": pb.CLIENT_AUTH_METHOD_NONE}, "server.auth_method", "JWT_BEARER"),
    ],
)
async def test_an_assertion_file_with_a_method_it_cannot_serve_is_refused(
    service: Harness, fields: dict[str, int], field: str, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.register("wl", secret=None, assertion_file="token", **fields)
    assert error_info(caught.value).metadata["field"] == field
    assert says in (caught.value.details() or "")
