"""RFC 8705 mutual-TLS client authentication and outbound trust for private CAs,
against panva's oidc-provider over real TLS (see tests/oidc.py).

The provider serves https with a certificate from a test CA that no system
store holds, so every request here also proves ``outbound_ca_file``. Its
clients authenticate with a certificate from a client CA (``tls_client_auth``)
or with a self-signed one registered in their jwks
(``self_signed_tls_client_auth``). Every token is shown to a real
ProtectedMCPServer, which checks it against the provider's signing key.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
import pytest_asyncio

from tokensvc import logs
from tokensvc.client_cert import bundle
from tokensvc.demo.authserver import AuthServer
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.egress import Egress, http11
from tokensvc.errors import (
    AuthorizationServerUnavailable,
    CredentialsRejected,
    InvalidArgument,
    TokenRequestRejected,
)
from tokensvc.oauth import TokenFetcher
from tokensvc.outbound_tls import OutboundTrust
from tokensvc.registration import (
    AuthMethod,
    Credential,
    CredentialKind,
    ServerSpec,
    validate_credential,
)
from tokensvc.token import Secret
from tokensvc.v1 import tokensvc_pb2 as pb

from certs import CertificateAuthority, Issued, expired, self_signed
from oidc import OidcProvider, secret_client, self_signed_client, tls_client
from support import error_info, forms, header_and_claims, running_service, whoami

TLS_CLIENT, SELF_SIGNED, SECRET_CLIENT = "tls-client", "self-signed-client", "secret-client"
SUBJECT = "CN=tokensvc-broker"
SECRET = "s3cret-over-tls"
# One provider (and one event loop) for the module: node starts once.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("pki")
    server_ca = CertificateAuthority(root / "server-ca", "private server CA")
    client_ca = CertificateAuthority(root / "client-ca", "client CA")
    unrelated_ca = CertificateAuthority(root / "unrelated", "unrelated CA")
    return {
        "server_ca": server_ca,
        "server": server_ca.server(),
        "client_ca": client_ca,
        "client": client_ca.client("broker", common_name="tokensvc-broker"),
        "stranger": client_ca.client("stranger", common_name="someone-else"),
        "self_signed": self_signed(root / "alone", "robot"),
        "other_self_signed": self_signed(root / "alone", "impostor"),
        "unrelated_ca": unrelated_ca,
        # The right subject from a CA the provider does not trust.
        "forged": unrelated_ca.client("forged", common_name="tokensvc-broker"),
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def provider(pki: dict[str, Any]) -> AsyncIterator[OidcProvider]:
    clients = [
        tls_client(TLS_CLIENT, SUBJECT),
        self_signed_client(SELF_SIGNED, pki["self_signed"].cert_pem),
        secret_client(SECRET_CLIENT, SECRET),
    ]
    tls = {
        "cert": pki["server"].cert_pem.decode(),
        "key": pki["server"].key_pem.decode(),
        "client_ca": pki["client_ca"].pem.decode(),
    }
    async with OidcProvider(clients, tls=tls) as started:
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mcp(provider: OidcProvider, pki: dict[str, Any]) -> AsyncIterator[ProtectedMCPServer]:
    # The MCP server is given the provider's key: its own JWKS fetch knows no private CA.
    trust = ssl.create_default_context(cafile=pki["server_ca"].path)
    async with httpx2.AsyncClient(verify=trust) as http:
        jwk = (await http.get(provider.jwks_uri)).json()["keys"][0]
    async with ProtectedMCPServer(issuer=provider.issuer, jwk=jwk) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fetcher(pki: dict[str, Any]) -> AsyncIterator[TokenFetcher]:
    fetcher = TokenFetcher(Egress(ca_file=pki["server_ca"].path))
    try:
        yield fetcher
    finally:
        await fetcher.aclose()


def certificate(issued: Issued) -> Credential:
    value = bundle(issued.cert_pem.decode(), issued.key_pem.decode())
    return Credential(CredentialKind.CLIENT_CERTIFICATE, Secret(value))


def spec(provider: OidcProvider, mcp: ProtectedMCPServer, **fields: Any) -> ServerSpec:
    values: dict[str, Any] = {
        "id": "mtls",
        "mcp_url": mcp.url,
        "token_endpoint": provider.token_endpoint,
        "client_id": TLS_CLIENT,
        "scopes": ("read",),
        **fields,
    }
    return ServerSpec(**values)


# --- the token request presents the certificate ------------------------------------


@pytest.mark.parametrize(
    ("client_id", "method", "issued"),
    [
        (TLS_CLIENT, AuthMethod.TLS_CLIENT_AUTH, "client"),
        (SELF_SIGNED, AuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH, "self_signed"),
    ],
)
async def test_the_certificate_authenticates_the_client_and_the_mcp_server_accepts_the_token(
    provider: OidcProvider,
    mcp: ProtectedMCPServer,
    fetcher: TokenFetcher,
    pki: dict[str, Any],
    client_id: str,
    method: AuthMethod,
    issued: str,
) -> None:
    server = spec(provider, mcp, client_id=client_id, auth_method=method)
    token = await fetcher.fetch(server, certificate(pki[issued]))
    who = await whoami(mcp, token.access_token)
    assert (who["client_id"], who["scopes"]) == (client_id, ["read"])


@pytest.mark.parametrize(
    ("client_id", "right", "wrong"),
    [
        (TLS_CLIENT, "client", "stranger"),
        (TLS_CLIENT, "client", "forged"),
        (SELF_SIGNED, "self_signed", "other_self_signed"),
    ],
)
async def test_a_wrong_certificate_is_refused_and_never_rides_on_the_right_ones_connection(
    provider: OidcProvider,
    mcp: ProtectedMCPServer,
    fetcher: TokenFetcher,
    pki: dict[str, Any],
    client_id: str,
    right: str,
    wrong: str,
) -> None:
    """One fetcher, one endpoint: a kept-alive connection made with the right
    certificate must not carry the wrong one's request (nor the other way)."""
    server = spec(provider, mcp, client_id=client_id)
    assert await fetcher.fetch(server, certificate(pki[right]))
    with pytest.raises(CredentialsRejected) as refused:
        await fetcher.fetch(server, certificate(pki[wrong]))
    assert (refused.value.oauth.error, refused.value.oauth.status_code) == ("invalid_client", 401)
    assert await fetcher.fetch(server, certificate(pki[right]))


async def test_concurrent_requests_with_certificates_evicting_each_other_get_their_own_tokens(
    provider: OidcProvider,
    mcp: ProtectedMCPServer,
    pki: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Room for one destination, two certificates: each request evicts the
    other's destination while its requests are in flight. None may fail,
    none may get the other client's token, and no connection of an evicted
    destination is left open."""
    monkeypatch.setattr(http11, "MAX_DESTINATIONS", 1)
    fetcher = TokenFetcher(Egress(ca_file=pki["server_ca"].path))
    clients = [(TLS_CLIENT, "client"), (SELF_SIGNED, "self_signed")] * 40
    try:
        tokens = await asyncio.gather(
            *(
                fetcher.fetch(spec(provider, mcp, client_id=client), certificate(pki[issued]))
                for client, issued in clients
            )
        )
        poster = fetcher._poster
        # Each connection of an evicted destination was closed once its answer was read.
        [kept] = poster._destinations.values()
        assert kept.idle and poster.open_connections == len(kept.idle)
    finally:
        await fetcher.aclose()
    got = [header_and_claims(token.access_token)[1]["client_id"] for token in tokens]
    assert got == [client for client, _ in clients]


async def test_a_certificate_is_never_sent_over_plain_http(pki: dict[str, Any]) -> None:
    plain = ServerSpec(
        id="plain",
        mcp_url="http://127.0.0.1:9/mcp",
        token_endpoint="http://127.0.0.1:9/token",
        client_id=TLS_CLIENT,
    )
    with pytest.raises(InvalidArgument, match=r"server\.token_endpoint: .* is plain http"):
        validate_credential(certificate(pki["client"]), plain)
    fetcher = TokenFetcher()  # a discovered http endpoint is refused at the request
    try:
        with pytest.raises(TokenRequestRejected, match="not https"):
            await fetcher.fetch(plain, certificate(pki["client"]))
    finally:
        await fetcher.aclose()


async def test_a_certificate_for_a_discovered_plain_http_endpoint_is_refused_at_registration(
    pki: dict[str, Any], tmp_path: Path
) -> None:
    issued: Issued = pki["client"]
    async with (
        AuthServer() as plain,  # http on loopback: allowed for secrets, not for certificates
        running_service(tmp_path / "data", plain, run_scheduler=False) as tokensvc,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tokensvc.admin.RegisterServer(
                pb.RegisterServerRequest(
                    server=pb.Server(
                        id="plain",
                        mcp_url="http://127.0.0.1:9/mcp",
                        issuer=plain.issuer,
                        client_id="c",
                    ),
                    client_certificate=pb.ClientCertificate(
                        certificate_pem=issued.cert_pem.decode(),
                        private_key_pem=issued.key_pem.decode(),
                    ),
                )
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).metadata["field"] == "server.issuer"
    assert "is plain http" in (refused.value.details() or "")


async def test_an_expired_certificate_is_not_presented(pki: dict[str, Any], tmp_path: Path) -> None:
    stale = expired(CertificateAuthority(tmp_path / "ca"), "stale")
    server = ServerSpec(
        id="stale",
        mcp_url="https://127.0.0.1:9/mcp",
        token_endpoint="https://127.0.0.1:9/token",  # nothing listens: nothing may be sent
        client_id=TLS_CLIENT,
    )
    fetcher = TokenFetcher()
    try:
        with pytest.raises(CredentialsRejected, match=r"client certificate expired at .* renewed"):
            await fetcher.fetch(server, certificate(stale))
    finally:
        await fetcher.aclose()


async def test_the_client_key_is_loaded_from_a_memory_file_closed_at_once(
    pki: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []
    memfd_create = os.memfd_create

    def recording(name: str, flags: int = 0) -> int:
        opened.append(memfd_create(name, flags))
        return opened[-1]

    monkeypatch.setattr(os, "memfd_create", recording)
    issued: Issued = pki["client"]
    OutboundTrust().client_context(issued.cert_pem.decode(), issued.key_pem.decode())
    assert len(opened) == 1
    with pytest.raises(OSError):  # closed: nothing of the key is left behind
        os.fstat(opened[0])


# --- trust for a private CA ----------------------------------------------------------


async def test_a_private_ca_is_refused_until_outbound_ca_file_names_it_and_its_changes_apply(
    provider: OidcProvider, mcp: ProtectedMCPServer, pki: dict[str, Any], tmp_path: Path
) -> None:
    server = spec(provider, mcp, client_id=SECRET_CLIENT)
    secret = Credential(CredentialKind.CLIENT_SECRET, Secret(SECRET))
    system_only = TokenFetcher()
    try:
        with pytest.raises(AuthorizationServerUnavailable, match="TLS certificate is not trusted"):
            await system_only.fetch(server, secret)
    finally:
        await system_only.aclose()
    ca_file = tmp_path / "outbound-ca.pem"
    ca_file.write_bytes(pki["unrelated_ca"].pem)
    fetcher = TokenFetcher(Egress(ca_file=ca_file))
    try:
        with pytest.raises(AuthorizationServerUnavailable, match="outbound_ca_file") as refused:
            await fetcher.fetch(server, secret)
        assert "unable to get local issuer certificate" in refused.value.message
        # Replaced while running, as a mounted Secret or ConfigMap is: no restart.
        replacement = tmp_path / "outbound-ca.pem.new"
        replacement.write_bytes(pki["unrelated_ca"].pem + pki["server_ca"].pem)
        replacement.replace(ca_file)
        token = await fetcher.fetch(server, secret)
        assert (await whoami(mcp, token.access_token))["client_id"] == SECRET_CLIENT
        # A file that stops parsing keeps the trust that worked.
        ca_file.write_text("not a certificate")
        assert await fetcher.fetch(server, secret)
    finally:
        await fetcher.aclose()


async def test_a_ca_taken_out_of_outbound_ca_file_is_no_longer_trusted_by_kept_connections(
    provider: OidcProvider, mcp: ProtectedMCPServer, pki: dict[str, Any], tmp_path: Path
) -> None:
    """A kept-alive connection was verified under the old trust: the next
    request after the CA file changed goes on a new connection, verified anew."""
    server = spec(provider, mcp, client_id=SECRET_CLIENT)
    secret = Credential(CredentialKind.CLIENT_SECRET, Secret(SECRET))
    ca_file = tmp_path / "outbound-ca.pem"
    ca_file.write_bytes(pki["server_ca"].pem)
    fetcher = TokenFetcher(Egress(ca_file=ca_file))
    try:
        assert await fetcher.fetch(server, secret)
        assert await fetcher.fetch(server, secret)
        assert fetcher._poster.open_connections == 1  # kept alive and used again
        replacement = tmp_path / "outbound-ca.pem.new"
        replacement.write_bytes(pki["unrelated_ca"].pem)
        replacement.replace(ca_file)
        with pytest.raises(AuthorizationServerUnavailable, match="TLS certificate is not trusted"):
            await fetcher.fetch(server, secret)
        assert fetcher._poster.open_connections == 0
    finally:
        await fetcher.aclose()


# --- through tokensvc: what an admin and a broker do ----------------------------------


@pytest.mark.usefixtures("restore_logging")
async def test_an_admin_registers_a_certificate_by_issuer_and_its_key_is_never_shown(
    provider: OidcProvider,
    mcp: ProtectedMCPServer,
    pki: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Discovery over the private CA, tls_client_auth chosen from the provider's
    metadata, tokens the MCP server accepts; GetServer shows the certificate's
    subject and expiry. Its private key is found in no response, error, log
    line or file of the data dir."""
    logs.configure("debug")
    logging.getLogger().addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    issued: Issued = pki["client"]
    responses: list[bytes] = []
    errors: list[str] = []
    data_dir = tmp_path / "data"
    async with (
        AuthServer() as unused,
        running_service(
            data_dir, unused, outbound_ca_file=pki["server_ca"].path, run_scheduler=False
        ) as tokensvc,
    ):
        request = pb.RegisterServerRequest(
            server=pb.Server(
                id="mtls", mcp_url=mcp.url, issuer=provider.issuer, client_id=TLS_CLIENT
            ),
            client_certificate=pb.ClientCertificate(
                certificate_pem=issued.cert_pem.decode(), private_key_pem=issued.key_pem.decode()
            ),
        )
        registered = await tokensvc.admin.RegisterServer(request)
        responses.append(registered.SerializeToString())
        assert registered.effective_auth_method == pb.CLIENT_AUTH_METHOD_TLS_CLIENT_AUTH
        token = await tokensvc.tokens.GetToken(pb.GetTokenRequest(server_id="mtls"))
        responses.append(token.SerializeToString())
        assert (await whoami(mcp, token.access_token))["client_id"] == TLS_CLIENT
        tested = await tokensvc.admin.TestServer(pb.TestServerRequest(id="mtls", call_mcp=True))
        responses.append(tested.SerializeToString())
        assert tested.ok, tested
        shown = await tokensvc.admin.GetServer(pb.GetServerRequest(id="mtls"))
        responses.append(shown.SerializeToString())
        responses.append(
            (await tokensvc.admin.ListServers(pb.ListServersRequest())).SerializeToString()
        )
        assert shown.credential.kind == "client_certificate"
        assert shown.credential.certificate_subject == SUBJECT
        expiry = shown.credential.expire_time.ToDatetime(
            tzinfo=issued.certificate.not_valid_after_utc.tzinfo
        )
        assert expiry == issued.certificate.not_valid_after_utc

        # The wrong certificate: refused by the provider, reported as such.
        stranger: Issued = pki["stranger"]
        request.server.id = "stranger"
        request.client_certificate.certificate_pem = stranger.cert_pem.decode()
        request.client_certificate.private_key_pem = stranger.key_pem.decode()
        responses.append((await tokensvc.admin.RegisterServer(request)).SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tokensvc.tokens.GetToken(pb.GetTokenRequest(server_id="stranger"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value).reason == "CREDENTIALS_REJECTED"
        errors.append(repr(caught.value) + str(caught.value.trailing_metadata()))
        tested = await tokensvc.admin.TestServer(pb.TestServerRequest(id="stranger"))
        assert (tested.steps[-1].reason, tested.steps[-1].error) == (
            "CREDENTIALS_REJECTED",
            "invalid_client",
        )
        responses.append(tested.SerializeToString())
    files = b"".join(
        p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file() and p.name != "keys"
    )
    assert stat.S_IMODE((data_dir / "tokensvc.db").stat().st_mode) == 0o600
    log_text = "\n".join(
        fmt.format(record)
        for record in caplog.records
        for fmt in (logs.TextFormatter(), logs.JsonFormatter())
    )
    assert "mtls" in log_text
    for key in (issued.key_pem, stranger.key_pem):
        lines = [line for line in key.decode().splitlines() if "-----" not in line]
        for line in lines:
            for form in forms(line):
                assert form not in files
                assert all(form not in response for response in responses)
                assert form.decode(errors="ignore") not in log_text
                assert all(form.decode(errors="ignore") not in error for error in errors)
