"""Interop with an authorization server nobody here wrote: panva's oidc-provider
(OpenID-certified), run by Node from tests/interop (see tests/oidc.py).

First with plain httpx2, to pin down what oidc-provider accepts and answers;
then with tokensvc's TokenFetcher. Every token is also shown to a real
ProtectedMCPServer, through the official MCP SDK client, which checks its
RS256 signature against the provider's JWKS, its issuer, audience and expiry.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import httpx2
import pytest

from tokensvc.demo.authserver import AuthServer
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.errors import CredentialsRejected, TokenRequestRejected
from tokensvc.oauth import TokenFetcher
from tokensvc.registration import AuthMethod, Credential, CredentialKind, ServerSpec
from tokensvc.token import Secret
from tokensvc.v1 import tokensvc_pb2 as pb

from oidc import (
    ASSERTION_TYPE,
    ClientKey,
    OidcProvider,
    key_client,
    secret_client,
)
from support import bearer_call, header_and_claims, running_service, whoami

TTL = 60  # seconds, the provider's client_credentials token lifetime
# oidc-provider takes printable ASCII secrets only (no "é"); these characters
# must be form-urlencoded inside client_secret_basic (RFC 6749 section 2.3.1).

SECRET = "Sup3r:Secret+%20 &/=-7f1a"
BASIC, POST = "basic-client", "post-client"
ALGS = ("RS256", "ES256", "PS256")


@pytest.fixture(scope="session")
def keys() -> dict[str, ClientKey]:
    return {alg: ClientKey.generate(alg) for alg in ALGS}


def key_client_id(alg: str) -> str:
    return f"{alg.lower()}-client"


@pytest.fixture
async def provider(keys: dict[str, ClientKey]) -> AsyncIterator[OidcProvider]:
    clients = [
        secret_client(BASIC, SECRET),
        secret_client(POST, SECRET, auth_method="client_secret_post"),
        *(key_client(key_client_id(alg), key) for alg, key in keys.items()),
    ]
    async with OidcProvider(clients, ttl=TTL) as started:
        yield started


@pytest.fixture
async def mcp(provider: OidcProvider) -> AsyncIterator[ProtectedMCPServer]:
    async with ProtectedMCPServer(issuer=provider.issuer, jwks_uri=provider.jwks_uri) as server:
        yield server


# --- helpers ---------------------------------------------------------------------


def basic(client_id: str, secret: str) -> dict[str, str]:
    """client_secret_basic as RFC 6749 section 2.3.1 has it: form-urlencode, then base64."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


async def post_token(
    provider: OidcProvider, form: dict[str, Any], headers: dict[str, str] | None = None
) -> httpx2.Response:
    async with httpx2.AsyncClient() as http:
        return await http.post(
            provider.token_endpoint,
            data={"grant_type": "client_credentials", **form},
            headers=headers,
        )


# --- the provider, with plain httpx2 -----------------------------------------------


async def test_discovery_names_what_tokensvc_needs(provider: OidcProvider) -> None:
    async with httpx2.AsyncClient() as http:
        openid = (await http.get(provider.discovery_url)).json()
        rfc8414 = await http.get(provider.issuer + "/.well-known/oauth-authorization-server")
        jwks = (await http.get(openid["jwks_uri"])).json()
    assert rfc8414.status_code == 200 and rfc8414.json() == openid  # both paths, one document
    assert openid["issuer"] == provider.issuer  # exactly: no trailing "/"
    assert openid["token_endpoint"] == provider.token_endpoint
    assert openid["jwks_uri"] == provider.jwks_uri
    assert "client_credentials" in openid["grant_types_supported"]
    assert openid["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ]
    assert openid["token_endpoint_auth_signing_alg_values_supported"] == ["RS256", "PS256", "ES256"]
    [key] = jwks["keys"]
    assert (key["kty"], key["alg"], key["use"]) == ("RSA", "RS256", "sig")
    assert "d" not in key


# How a test authenticates: (client_id, form fields, headers).
Authentication = tuple[str, dict[str, str], dict[str, str]]


def _secret_basic(provider: OidcProvider, keys: dict[str, ClientKey]) -> Authentication:
    return BASIC, {}, basic(BASIC, SECRET)


def _secret_post(provider: OidcProvider, keys: dict[str, ClientKey]) -> Authentication:
    return POST, {"client_id": POST, "client_secret": SECRET}, {}


def _key_jwt(alg: str, audience: str) -> Callable[..., Authentication]:
    def build(provider: OidcProvider, keys: dict[str, ClientKey]) -> Authentication:
        client_id = key_client_id(alg)
        aud = provider.issuer if audience == "issuer" else provider.token_endpoint
        form = {
            "client_id": client_id,  # optional; oidc-provider takes it from sub otherwise
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": keys[alg].assertion(client_id, aud),
        }
        return client_id, form, {}

    return build


AUTHENTICATIONS = {
    "client_secret_basic": _secret_basic,
    "client_secret_post": _secret_post,
    "private_key_jwt-RS256-aud=issuer": _key_jwt("RS256", "issuer"),
    "private_key_jwt-RS256-aud=token_endpoint": _key_jwt("RS256", "token_endpoint"),
    "private_key_jwt-ES256-aud=issuer": _key_jwt("ES256", "issuer"),
    "private_key_jwt-ES256-aud=token_endpoint": _key_jwt("ES256", "token_endpoint"),
    "private_key_jwt-PS256-aud=issuer": _key_jwt("PS256", "issuer"),
}


@pytest.mark.parametrize("how", AUTHENTICATIONS)
async def test_a_token_from_plain_httpx2_is_accepted_by_the_mcp_server(
    provider: OidcProvider, mcp: ProtectedMCPServer, keys: dict[str, ClientKey], how: str
) -> None:
    client_id, form, headers = AUTHENTICATIONS[how](provider, keys)
    response = await post_token(provider, {**form, "resource": mcp.url, "scope": "read"}, headers)

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == TTL and isinstance(body["expires_in"], int)
    assert body["scope"] == "read"

    header, claims = header_and_claims(body["access_token"])
    assert header["alg"] == "RS256" and header["typ"] == "at+jwt" and header["kid"]
    assert claims["iss"] == provider.issuer
    assert claims["aud"] == mcp.url  # a string, the resource exactly as sent
    assert claims["sub"] == claims["client_id"] == client_id
    assert claims["scope"] == "read"
    assert claims["exp"] - claims["iat"] == TTL

    who = await whoami(mcp, body["access_token"])
    assert who == {"client_id": client_id, "scopes": ["read"], "jti": claims["jti"]}
    assert mcp.rejected == 0


async def test_a_client_assertion_is_accepted_once(
    provider: OidcProvider, mcp: ProtectedMCPServer, keys: dict[str, ClientKey]
) -> None:
    client_id = key_client_id("ES256")
    form = {
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": keys["ES256"].assertion(client_id, provider.issuer),
        "resource": mcp.url,
    }
    assert (await post_token(provider, form)).status_code == 200
    replayed = await post_token(provider, form)
    assert replayed.status_code == 401
    assert replayed.json()["error"] == "invalid_client"


Refusal = tuple[dict[str, Any], dict[str, str], int, str | None]  # form, headers, status, error


def _refusals(
    provider: OidcProvider, keys: dict[str, ClientKey], mcp_url: str
) -> dict[str, Refusal]:
    rs256 = key_client_id("RS256")

    def assertion(
        audience: str | list[str], *, alg: str = "RS256", key: str = "RS256"
    ) -> dict[str, Any]:
        return {
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": keys[key].assertion(rs256, audience, alg=alg),
            "resource": mcp_url,
        }

    resource = {"resource": mcp_url}
    return {
        "wrong secret, basic": (resource, basic(BASIC, "wrong"), 401, "invalid_client"),
        "wrong secret, post": (
            {**resource, "client_id": POST, "client_secret": "wrong"},
            {},
            401,
            "invalid_client",
        ),
        "unknown client": (resource, basic("nobody", SECRET), 401, "invalid_client"),
        # The secret as is, not form-urlencoded: "+" is read as a space.
        "basic without form-urlencoding": (
            resource,
            {"Authorization": "Basic " + base64.b64encode(f"{BASIC}:{SECRET}".encode()).decode()},
            401,
            "invalid_client",
        ),
        "resource off loopback": (
            {"resource": "https://elsewhere.example/mcp"},
            basic(BASIC, SECRET),
            400,
            "invalid_target",
        ),
        "two resources": (
            {"resource": [mcp_url, mcp_url + "/other"]},
            basic(BASIC, SECRET),
            400,
            "invalid_target",
        ),
        "resource with fragment": (
            {"resource": mcp_url + "#x"},
            basic(BASIC, SECRET),
            400,
            "invalid_target",
        ),
        "relative resource": ({"resource": "mcp"}, basic(BASIC, SECRET), 400, "invalid_target"),
        "assertion for another audience": (
            assertion(provider.issuer + "/elsewhere"),
            {},
            401,
            "invalid_client",
        ),
        "assertion aud as a list with the issuer": (
            assertion([provider.issuer, "https://other.example"]),
            {},
            200,
            None,
        ),
        "assertion with another alg than registered": (
            assertion(provider.issuer, alg="ES256", key="ES256"),
            {},
            401,
            "invalid_client",
        ),
        "assertion signed by another key": (
            assertion(provider.issuer, alg="RS256", key="PS256"),
            {},
            401,
            "invalid_client",
        ),
    }


REFUSALS = [
    "wrong secret, basic",
    "wrong secret, post",
    "unknown client",
    "basic without form-urlencoding",
    "resource off loopback",
    "two resources",
    "resource with fragment",
    "relative resource",
    "assertion for another audience",
    "assertion aud as a list with the issuer",
    "assertion with another alg than registered",
    "assertion signed by another key",
]


@pytest.mark.parametrize("case", REFUSALS)
async def test_what_oidc_provider_refuses(
    provider: OidcProvider, mcp: ProtectedMCPServer, keys: dict[str, ClientKey], case: str
) -> None:
    form, headers, status, error = _refusals(provider, keys, mcp.url)[case]
    response = await post_token(provider, form, headers)
    assert response.status_code == status, response.text
    if error is None:
        return
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    if status == 401 and "Authorization" in headers:
        # Only a request that tried HTTP Basic gets a challenge back.
        assert response.headers["www-authenticate"].startswith("Basic realm=")
    elif status == 401:
        assert "www-authenticate" not in response.headers


async def test_scopes_the_resource_does_not_offer_are_dropped_not_refused(
    provider: OidcProvider, mcp: ProtectedMCPServer
) -> None:
    granted = {}
    for asked in ("read write", "read admin", "admin", None):
        form = {"resource": mcp.url} | ({"scope": asked} if asked else {})
        response = await post_token(provider, form, basic(BASIC, SECRET))
        assert response.status_code == 200, response.text
        body = response.json()
        claims = header_and_claims(body["access_token"])[1]
        assert body.get("scope") == claims.get("scope")  # echoed exactly when granted
        granted[asked] = body.get("scope")
    assert granted == {"read write": "read write", "read admin": "read", "admin": None, None: None}


async def test_without_resource_the_token_is_opaque_and_refused_by_the_mcp_server(
    provider: OidcProvider, mcp: ProtectedMCPServer
) -> None:
    response = await post_token(provider, {"scope": "read"}, basic(BASIC, SECRET))
    assert response.status_code == 200
    body = response.json()
    assert "." not in body["access_token"]  # opaque: no resource server, no JWT
    assert "scope" not in body  # "read" is no OpenID scope, and no resource offers it
    assert await bearer_call(mcp.url, body["access_token"]) == 401


async def test_either_secret_method_works_whichever_is_registered(
    provider: OidcProvider, mcp: ProtectedMCPServer
) -> None:
    as_post = {"client_id": BASIC, "client_secret": SECRET, "resource": mcp.url}
    assert (await post_token(provider, as_post)).status_code == 200
    as_basic = await post_token(provider, {"resource": mcp.url}, basic(POST, SECRET))
    assert as_basic.status_code == 200


# --- tokensvc's TokenFetcher ---------------------------------------------------------


@pytest.fixture
async def fetcher() -> AsyncIterator[TokenFetcher]:
    fetcher = TokenFetcher()
    try:
        yield fetcher
    finally:
        await fetcher.aclose()


def spec_for(provider: OidcProvider, mcp: ProtectedMCPServer, **fields: Any) -> ServerSpec:
    return ServerSpec(
        **{
            "id": "oidc",
            "mcp_url": mcp.url,
            "token_endpoint": provider.token_endpoint,
            "client_id": BASIC,
            "scopes": ("read",),
            **fields,
        }
    )


@pytest.mark.parametrize(
    ("client_id", "method"),
    [(BASIC, AuthMethod.CLIENT_SECRET_BASIC), (POST, AuthMethod.CLIENT_SECRET_POST)],
)
async def test_token_fetcher_gets_a_token_the_mcp_server_accepts(
    provider: OidcProvider,
    mcp: ProtectedMCPServer,
    fetcher: TokenFetcher,
    client_id: str,
    method: AuthMethod,
) -> None:
    spec = spec_for(provider, mcp, client_id=client_id, auth_method=method)
    token = await fetcher.fetch(spec, Credential(CredentialKind.CLIENT_SECRET, Secret(SECRET)))

    assert token.token_type == "Bearer"
    assert token.scopes == ("read",)
    assert token.expires_at - token.issued_at == timedelta(seconds=TTL)  # from expires_in
    claims = header_and_claims(token.access_token)[1]
    assert (claims["aud"], claims["client_id"]) == (mcp.url, client_id)
    who = await whoami(mcp, token.access_token)
    assert (who["client_id"], who["scopes"]) == (client_id, ["read"])


async def test_token_fetcher_reads_oidc_provider_refusals(
    provider: OidcProvider, mcp: ProtectedMCPServer, fetcher: TokenFetcher
) -> None:
    wrong = Credential(CredentialKind.CLIENT_SECRET, Secret("wrong"))
    with pytest.raises(CredentialsRejected) as rejected:
        await fetcher.fetch(spec_for(provider, mcp), wrong)
    assert (rejected.value.oauth.error, rejected.value.oauth.status_code) == ("invalid_client", 401)

    right = Credential(CredentialKind.CLIENT_SECRET, Secret(SECRET))
    elsewhere = spec_for(provider, mcp, resource="https://elsewhere.example/mcp")
    with pytest.raises(TokenRequestRejected) as refused:
        await fetcher.fetch(elsewhere, right)
    assert (refused.value.oauth.error, refused.value.oauth.status_code) == ("invalid_target", 400)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_token_fetcher_private_key_jwt(
    provider: OidcProvider,
    mcp: ProtectedMCPServer,
    fetcher: TokenFetcher,
    keys: dict[str, ClientKey],
    alg: str,
) -> None:
    spec = spec_for(
        provider,
        mcp,
        client_id=key_client_id(alg),
        issuer=provider.issuer,
        auth_method=AuthMethod.PRIVATE_KEY_JWT,
    )
    credential = Credential(CredentialKind.PRIVATE_KEY, Secret(keys[alg].private_pem))
    token = await fetcher.fetch(spec, credential)

    assert token.token_type == "Bearer" and token.scopes == ("read",)
    who = await whoami(mcp, token.access_token)
    assert (who["client_id"], who["scopes"]) == (key_client_id(alg), ["read"])


# --- through tokensvc: what an admin and a broker do -----------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_an_mcp_url_a_client_id_and_a_private_key_are_all_an_admin_gives(
    provider: OidcProvider,
    mcp: ProtectedMCPServer,
    keys: dict[str, ClientKey],
    alg: str,
    tmp_path: Path,
) -> None:
    """Discovery from the MCP server (RFC 9728 → RFC 8414), private_key_jwt chosen
    from the provider's metadata, a token oidc-provider issues for the MCP URL,
    and the MCP server accepts it."""
    async with AuthServer() as unused, running_service(tmp_path, unused) as tokensvc:
        server = await tokensvc.admin.RegisterServer(
            pb.RegisterServerRequest(
                server=pb.Server(
                    id="oidc", mcp_url=mcp.url, client_id=key_client_id(alg), scopes=["read"]
                ),
                private_key_pem=keys[alg].private_pem,
            )
        )
        assert server.discovery.issuer == provider.issuer
        assert server.discovery.token_endpoint == provider.token_endpoint
        assert server.effective_auth_method == pb.CLIENT_AUTH_METHOD_PRIVATE_KEY_JWT
        token = await tokensvc.tokens.GetToken(pb.GetTokenRequest(server_id="oidc"))
        who = await whoami(mcp, token.access_token)
        assert who["client_id"] == key_client_id(alg)
        tested = await tokensvc.admin.TestServer(pb.TestServerRequest(id="oidc", call_mcp=True))
        assert tested.ok, tested


@pytest.mark.parametrize(("client_id", "method"), [(BASIC, 1), (POST, 2)])
async def test_secret_clients_work_through_tokensvc_by_issuer(
    provider: OidcProvider,
    mcp: ProtectedMCPServer,
    tmp_path: Path,
    client_id: str,
    method: int,
) -> None:
    async with AuthServer() as unused, running_service(tmp_path, unused) as tokensvc:
        await tokensvc.admin.RegisterServer(
            pb.RegisterServerRequest(
                server=pb.Server(
                    id="oidc",
                    mcp_url=mcp.url,
                    issuer=provider.issuer,
                    client_id=client_id,
                    auth_method=method,  # type: ignore[arg-type]
                ),
                client_secret=SECRET,
            )
        )
        token = await tokensvc.tokens.GetToken(pb.GetTokenRequest(server_id="oidc"))
        assert (await whoami(mcp, token.access_token))["client_id"] == client_id


async def test_a_wrong_key_is_refused_by_the_provider_and_reported(
    provider: OidcProvider, mcp: ProtectedMCPServer, keys: dict[str, ClientKey], tmp_path: Path
) -> None:
    async with AuthServer() as unused, running_service(tmp_path, unused) as tokensvc:
        await tokensvc.admin.RegisterServer(
            pb.RegisterServerRequest(
                server=pb.Server(id="oidc", mcp_url=mcp.url, client_id=key_client_id("RS256")),
                private_key_pem=ClientKey.generate("RS256").private_pem,  # not the registered one
            )
        )
        tested = await tokensvc.admin.TestServer(pb.TestServerRequest(id="oidc"))
        assert not tested.ok
        step = tested.steps[-1]
        assert (step.name, step.reason, step.error) == (
            "token_request",
            "CREDENTIALS_REJECTED",
            "invalid_client",
        )
