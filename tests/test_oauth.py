"""TokenFetcher against a real authorization server over loopback HTTP.

Most tests run the real fetcher against ``AuthServer`` (authlib's server side,
served by uvicorn on 127.0.0.1) and assert what went over the wire. A few wire
shapes that the real server cannot produce (an opaque token, a body that never
ends, a redirect, cookies) are answered by a handler on a fake network
(``HandlerNetwork``) instead, still read by the real HTTP/1.1 client; each of
those says so in its docstring.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qsl, quote_plus

import httpx2
import pytest
from joserfc import jwt
from joserfc.jwk import RSAKey

from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.egress import Egress, http11
from tokensvc.errors import (
    AuthorizationServerUnavailable,
    CredentialsRejected,
    FetchError,
    InvalidTokenResponse,
    TokenRequestRejected,
)
from tokensvc.oauth import TokenFetcher
from tokensvc.registration import (
    AssertionAudience,
    AuthMethod,
    Credential,
    CredentialKind,
    ServerSpec,
)
from tokensvc.token import Secret, Token

from support import CLIENT_ID, SECRET, FakeClock, HandlerNetwork, RecordingNetwork

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
MOCK_ENDPOINT = "http://127.0.0.1:9/token"


def spec_for(token_endpoint: str, **changes: object) -> ServerSpec:
    fields: dict[str, object] = {
        "id": "files",
        "mcp_url": "http://127.0.0.1:8931/mcp",
        "token_endpoint": token_endpoint,
        "client_id": CLIENT_ID,
        "scopes": ("read",),
    }
    fields.update(changes)
    return ServerSpec(**fields)  # type: ignore[arg-type]


def credential(secret: str = SECRET) -> Credential:
    return Credential(CredentialKind.CLIENT_SECRET, Secret(secret))


def assert_safe(exc: FetchError, *hidden: str) -> None:
    """No secret (plain or as sent on the wire) in anything an error shows, and no
    foreign exception riding along that could carry the request or the body."""
    shown = [str(exc), repr(exc), json.dumps(exc.metadata(), ensure_ascii=False)]
    for value in (SECRET, quote_plus(SECRET), *hidden):
        for text in shown:
            assert value not in text
    assert exc.__cause__ is None
    assert exc.__context__ is None


def claims_of(token: Token, auth: AuthServer) -> dict[str, object]:
    key = RSAKey.import_key(auth.public_jwk)
    return dict(jwt.decode(token.access_token, key, algorithms=["RS256"]).claims)


@pytest.fixture
async def fetcher() -> AsyncIterator[TokenFetcher]:
    fetcher = TokenFetcher(clock=FakeClock(T0))
    yield fetcher
    await fetcher.aclose()


def mock_fetcher(
    handler: Callable[[httpx2.Request], httpx2.Response],
    max_response_bytes: int = 65536,
    **kwargs: object,
) -> TokenFetcher:
    egress = Egress(network=HandlerNetwork(handler), max_response_bytes=max_response_bytes)
    return TokenFetcher(egress, **kwargs)  # type: ignore[arg-type]


async def mock_fetch(
    handler: Callable[[httpx2.Request], httpx2.Response], **kwargs: object
) -> Token:
    fetcher = mock_fetcher(handler, **kwargs)  # type: ignore[arg-type]
    try:
        return await fetcher.fetch(spec_for(MOCK_ENDPOINT), credential())
    finally:
        await fetcher.aclose()


# -- the wire --------------------------------------------------------------------------


async def test_basic_auth_form_urlencodes_secret_before_base64(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    spec = spec_for(
        auth.token_endpoint,
        scopes=("read", "write"),
        resource="https://files.example/mcp",
        audience="files-api",
        extra_token_params=(("tenant", "acme corp"),),
    )

    token = await fetcher.fetch(spec, credential())

    scheme, encoded = auth.last_headers["authorization"].split(" ", 1)
    assert scheme == "Basic"
    assert (
        base64.b64decode(encoded).decode("ascii")
        == "broker-client:cs-Sup3r%3ASecret%2B%25%C3%A9%E2%82%AC-7f1a"
    )
    assert auth.last_form == {
        "grant_type": "client_credentials",
        "scope": "read write",
        "resource": "https://files.example/mcp",
        "audience": "files-api",
        "tenant": "acme corp",
    }
    assert auth.last_headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert token.access_token == auth.issued[-1]
    assert token.token_type == "Bearer"
    assert token.scopes == ("read", "write")


async def test_post_auth_sends_client_id_and_secret_in_the_form_body(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    spec = spec_for(auth.token_endpoint, auth_method=AuthMethod.CLIENT_SECRET_POST)

    token = await fetcher.fetch(spec, credential())

    assert "authorization" not in auth.last_headers
    assert auth.last_form == {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "scope": "read",
        "resource": "http://127.0.0.1:8931/mcp",
    }
    assert token.access_token == auth.issued[-1]


async def test_resource_defaults_to_mcp_url_and_becomes_the_audience_of_the_jwt(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    token = await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    claims = claims_of(token, auth)
    assert auth.last_form["resource"] == "http://127.0.0.1:8931/mcp"
    assert claims["aud"] == "http://127.0.0.1:8931/mcp"
    assert claims["iss"] == auth.issuer
    assert claims["sub"] == CLIENT_ID
    assert claims["scope"] == "read"


async def test_extra_params_named_like_http_client_options_are_sent_as_form_fields(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    extra = (("proxy", "p"), ("verify", "no"), ("timeout", "1"), ("headers", "h"))

    await fetcher.fetch(spec_for(auth.token_endpoint, extra_token_params=extra), credential())

    assert {key: auth.last_form[key] for key, _ in extra} == dict(extra)


async def test_no_scope_requested_takes_the_scopes_the_server_grants(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    token = await fetcher.fetch(spec_for(auth.token_endpoint, scopes=()), credential())

    assert "scope" not in auth.last_form
    assert token.scopes == ("read", "write")


async def test_concurrent_fetches_for_different_clients_keep_their_own_credentials(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    auth.add_client("other", "other-secret")
    specs = [spec_for(auth.token_endpoint, client_id=c) for c in (CLIENT_ID, "other") * 5]
    creds = [credential(), credential("other-secret")] * 5

    tokens = await asyncio.gather(*(fetcher.fetch(s, c) for s, c in zip(specs, creds, strict=True)))

    assert [claims_of(t, auth)["sub"] for t in tokens] == [CLIENT_ID, "other"] * 5


# -- expiry ----------------------------------------------------------------------------


async def test_expires_in_as_a_decimal_string_counts_from_receipt(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    auth.behaviour.expires_in = "3599.5"

    token = await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert token.issued_at == T0
    assert token.expires_at == T0 + timedelta(seconds=3599.5)


async def test_missing_expires_in_falls_back_to_the_jwt_exp(auth: AuthServer) -> None:
    auth.behaviour = Behaviour(expires_in=None, lifetime=600)
    now = datetime.now(UTC)
    fetcher = TokenFetcher(clock=FakeClock(now))

    try:
        token = await fetcher.fetch(spec_for(auth.token_endpoint), credential())
    finally:
        await fetcher.aclose()

    exp = claims_of(token, auth)["exp"]
    assert isinstance(exp, int)
    assert token.expires_at == datetime.fromtimestamp(exp, UTC)
    assert timedelta(seconds=590) < token.expires_at - now <= timedelta(seconds=601)


async def test_missing_expires_in_with_an_expired_jwt_uses_the_default_lifetime(
    auth: AuthServer,
) -> None:
    auth.behaviour = Behaviour(expires_in=None, lifetime=-60)
    now = datetime.now(UTC)
    fetcher = TokenFetcher(clock=FakeClock(now), default_lifetime=timedelta(seconds=42))

    try:
        token = await fetcher.fetch(spec_for(auth.token_endpoint), credential())
    finally:
        await fetcher.aclose()

    assert token.expires_at == now + timedelta(seconds=42)


@pytest.mark.parametrize(
    "expires_in", ["absent", None, 0, -5, "soon", True, "nan", 1e400, 10**400, [60]]
)
async def test_an_opaque_token_without_usable_expires_in_gets_the_default_lifetime(
    expires_in: object,
) -> None:
    """A handler: the real server only issues JWTs."""
    body: dict[str, object] = {"access_token": "opaque-abc", "token_type": "bearer"}
    if expires_in != "absent":
        body["expires_in"] = expires_in
    text = json.dumps(body).replace("Infinity", "1e400")  # json.dumps writes 1e400 as Infinity

    token = await mock_fetch(
        lambda request: httpx2.Response(200, text=text),
        clock=FakeClock(T0),
        default_lifetime=timedelta(seconds=123),
    )

    assert token.expires_at == T0 + timedelta(seconds=123)
    assert token.token_type == "Bearer"


async def test_a_huge_expires_in_is_capped_instead_of_overflowing() -> None:
    """A handler: the real server cannot send an absurd lifetime."""
    body = {"access_token": "opaque", "expires_in": 1e300}

    token = await mock_fetch(lambda r: httpx2.Response(200, json=body), clock=FakeClock(T0))

    assert timedelta(days=1) < token.lifetime <= timedelta(days=366)


async def test_lowercase_bearer_token_type_comes_back_as_bearer(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    auth.behaviour.token_type = "bearer"

    token = await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert token.token_type == "Bearer"


# -- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(("client_id", "secret"), [(CLIENT_ID, "wrong"), ("nobody", SECRET)])
@pytest.mark.parametrize("method", [AuthMethod.CLIENT_SECRET_BASIC, AuthMethod.CLIENT_SECRET_POST])
async def test_invalid_client_raises_credentials_rejected_with_the_error_fields(
    auth: AuthServer, fetcher: TokenFetcher, client_id: str, secret: str, method: AuthMethod
) -> None:
    spec = spec_for(auth.token_endpoint, client_id=client_id, auth_method=method)

    with pytest.raises(CredentialsRejected) as caught:
        await fetcher.fetch(spec, credential(secret))

    assert caught.value.oauth.error == "invalid_client"
    assert caught.value.oauth.status_code in (400, 401)
    assert caught.value.oauth.error_description
    assert caught.value.metadata()["error"] == "invalid_client"
    assert_safe(caught.value, secret, quote_plus(secret))


async def test_401_without_a_json_body_raises_credentials_rejected(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    auth.behaviour = Behaviour(
        fail_status=401, fail_body="Unauthorized", fail_content_type="text/plain"
    )

    with pytest.raises(CredentialsRejected) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert caught.value.oauth.status_code == 401
    assert caught.value.oauth.error == ""
    assert_safe(caught.value, "Unauthorized")


async def test_invalid_scope_raises_token_request_rejected(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    with pytest.raises(TokenRequestRejected) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint, scopes=("admin",)), credential())

    assert caught.value.oauth.error == "invalid_scope"
    assert caught.value.oauth.status_code == 400
    assert "invalid_scope" in str(caught.value)
    assert_safe(caught.value)


async def test_invalid_target_raises_token_request_rejected(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    spec = spec_for(auth.token_endpoint, resource="https://files.example/mcp#part")

    with pytest.raises(TokenRequestRejected) as caught:
        await fetcher.fetch(spec, credential())

    assert caught.value.oauth.error == "invalid_target"
    assert_safe(caught.value)


async def test_a_200_carrying_an_error_field_is_a_refusal(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    auth.behaviour = Behaviour(
        fail_status=200, fail_body='{"error": "invalid_grant", "error_description": "nope"}'
    )

    with pytest.raises(TokenRequestRejected) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert caught.value.oauth.error == "invalid_grant"
    assert caught.value.oauth.error_description == "nope"
    assert caught.value.oauth.status_code == 200
    assert_safe(caught.value)


def private_pem(kind: str) -> tuple[str, dict[str, object]]:
    """A fresh private key as PEM, and its public JWK."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from joserfc.jwk import ECKey

    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "RSA"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    jwk = (RSAKey if kind == "RSA" else ECKey).import_key(pem).as_dict(private=False)
    return pem, dict(jwk)


@pytest.mark.parametrize(
    ("kind", "alg", "audience", "expected_alg", "expected_aud"),
    [
        ("RSA", "", AssertionAudience.UNSPECIFIED, "RS256", "https://as.example"),
        ("RSA", "PS256", AssertionAudience.TOKEN_ENDPOINT, "PS256", MOCK_ENDPOINT),
        ("EC", "", AssertionAudience.ISSUER, "ES256", "https://as.example"),
    ],
)
async def test_private_key_jwt_sends_a_signed_assertion_and_no_secret(
    kind: str,
    alg: str,
    audience: AssertionAudience,
    expected_alg: str,
    expected_aud: str,
) -> None:
    """A handler: the wire of RFC 7523 section 2.2, verified with the public key."""
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import import_key

    pem, public = private_pem(kind)
    forms: list[dict[str, str]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        forms.append(dict(parse_qsl(request.content.decode())))
        assert "authorization" not in request.headers
        return httpx2.Response(200, json={"access_token": "t", "expires_in": 60})

    spec = spec_for(
        MOCK_ENDPOINT,
        issuer="https://as.example",
        auth_method=AuthMethod.PRIVATE_KEY_JWT,
        signing_alg=alg,
        assertion_audience=audience,
        key_id="key-1",
    )
    fetcher = mock_fetcher(handler)
    try:
        await fetcher.fetch(spec, Credential(CredentialKind.PRIVATE_KEY, Secret(pem)))
    finally:
        await fetcher.aclose()
    form = forms[0]
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert form["client_id"] == CLIENT_ID and "client_secret" not in form
    token = jose_jwt.decode(form["client_assertion"], import_key(public), algorithms=[expected_alg])
    assert token.header["alg"] == expected_alg and token.header["kid"] == "key-1"
    claims = token.claims
    assert claims["iss"] == claims["sub"] == CLIENT_ID and claims["aud"] == expected_aud
    assert claims["exp"] - claims["iat"] == 300 and len(claims["jti"]) >= 16
    assert "PRIVATE KEY" not in form["client_assertion"]


async def test_a_key_is_never_used_as_a_secret_nor_a_secret_as_a_key(auth: AuthServer) -> None:
    fetcher = TokenFetcher()
    try:
        with pytest.raises(TokenRequestRejected) as caught:
            await fetcher.fetch(
                spec_for(auth.token_endpoint, auth_method=AuthMethod.PRIVATE_KEY_JWT),
                credential(),
            )
    finally:
        await fetcher.aclose()
    assert "private_key_jwt" in str(caught.value)
    assert auth.token_requests == 0
    assert_safe(caught.value)


async def test_link_local_token_endpoint_is_refused_without_any_request() -> None:
    """A handler: proves that nothing at all was sent."""
    requests: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        requests.append(request)
        return httpx2.Response(200, json={"access_token": "x"})

    fetcher = mock_fetcher(handler)
    try:
        with pytest.raises(TokenRequestRejected) as caught:
            await fetcher.fetch(spec_for("http://169.254.169.254/token"), credential())
    finally:
        await fetcher.aclose()

    assert "link-local" in str(caught.value)
    assert requests == []
    assert_safe(caught.value)


async def test_a_redirect_is_refused_and_not_followed() -> None:
    """A handler: the real server does not redirect."""
    requests: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        requests.append(request)
        return httpx2.Response(302, headers={"Location": "http://127.0.0.1:10/token"})

    with pytest.raises(TokenRequestRejected) as caught:
        await mock_fetch(handler)

    assert len(requests) == 1
    assert caught.value.oauth.status_code == 302
    assert_safe(caught.value)


async def test_an_echoed_secret_and_control_characters_never_reach_the_error() -> None:
    """A handler: a hostile or sloppy server, which the real one is not."""
    description = f"bad secret {SECRET} \x1b[31mred\x1b[0m\r\nX-Injected: 1 " + "x" * 1000
    body = {"error": "invalid_request\n", "error_description": description}

    with pytest.raises(TokenRequestRejected) as caught:
        await mock_fetch(lambda r: httpx2.Response(400, json=body))

    fields = caught.value.oauth
    assert fields.error == "invalid_request"
    assert fields.error_description.startswith("bad secret *** [31mred[0mX-Injected: 1 xxx")
    assert len(fields.error_description) <= 256
    assert_safe(caught.value)


# -- an authorization server in trouble ------------------------------------------------


async def test_500_raises_authorization_server_unavailable(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    auth.behaviour = Behaviour(fail_status=500)

    with pytest.raises(AuthorizationServerUnavailable) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert caught.value.oauth.status_code == 500
    assert caught.value.oauth.error == "server_error"
    assert caught.value.retry_after is None
    assert_safe(caught.value)


async def test_html_502_raises_unavailable_and_the_html_never_shows(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    page = "<html><body><h1>502 Bad Gateway</h1><p>upstream nginx/1.25 said no</p></body></html>"
    auth.behaviour = Behaviour(fail_status=502, fail_body=page, fail_content_type="text/html")

    with pytest.raises(AuthorizationServerUnavailable) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert caught.value.oauth.status_code == 502
    assert caught.value.oauth.error == ""
    assert_safe(caught.value, "<html", "Bad Gateway", "nginx")


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("17", 17.0), (format_datetime(T0 + timedelta(seconds=90), usegmt=True), 90.0)],
)
async def test_429_with_retry_after_raises_unavailable_with_the_delay(
    auth: AuthServer, fetcher: TokenFetcher, header: str, seconds: float
) -> None:
    auth.behaviour = Behaviour(fail_status=429, retry_after=header)

    with pytest.raises(AuthorizationServerUnavailable) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert caught.value.retry_after == seconds
    assert caught.value.oauth.status_code == 429
    assert_safe(caught.value)


async def test_503_with_retry_after_passes_the_delay_on(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    auth.behaviour = Behaviour(fail_status=503, fail_body="down", retry_after="120")

    with pytest.raises(AuthorizationServerUnavailable) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert caught.value.retry_after == 120.0


@pytest.mark.parametrize(
    "body",
    [
        "access_token=abc&token_type=bearer",
        "[1, 2]",
        '"a string"',
        "{}",
        '{"token_type": "Bearer"}',
        '{"access_token": ""}',
        '{"access_token": 5}',
        '{"access_token": "line\\r\\nbreak"}',
        '{"access_token": "abc", "token_type": "Bearer Bearer"}',
        '{"access_token": "abc", "expires_in": NaN}',
        "[" * 10_000 + "]" * 10_000,
    ],
)
async def test_a_200_without_a_usable_token_raises_invalid_token_response(
    auth: AuthServer, fetcher: TokenFetcher, body: str
) -> None:
    auth.behaviour = Behaviour(fail_status=200, fail_body=body, fail_content_type="text/plain")

    with pytest.raises(InvalidTokenResponse) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert caught.value.oauth.status_code == 200
    assert_safe(caught.value, "abc")


async def test_a_response_larger_than_the_cap_raises_invalid_token_response(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    huge = json.dumps({"access_token": "a" * 100_000, "token_type": "Bearer"})
    auth.behaviour = Behaviour(fail_status=200, fail_body=huge)

    with pytest.raises(InvalidTokenResponse) as caught:
        await fetcher.fetch(spec_for(auth.token_endpoint), credential())

    assert "larger than 65536 bytes" in str(caught.value)
    assert_safe(caught.value, "a" * 100)


async def test_a_body_without_length_is_cut_off_at_the_cap_not_read_to_the_end() -> None:
    """A handler: a body that never ends, which the real server cannot send."""
    chunks_sent = 0

    class Endless(httpx2.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            nonlocal chunks_sent
            while True:
                chunks_sent += 1
                yield b" " * 1024

    with pytest.raises(InvalidTokenResponse) as caught:
        await mock_fetch(lambda r: httpx2.Response(200, stream=Endless()), max_response_bytes=8192)

    assert "larger than 8192 bytes" in str(caught.value)
    assert chunks_sent == 9


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP ready " + SECRET.encode() + b"\r\n\r\n",  # not HTTP at all
        b"HTTP/1.1 200 OK\r\nX-Echo: " + SECRET.encode() + b"\x00\r\n\r\n",  # a bad header
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n12345",
        b"HTTP/1.1 200 OK\r\n" + (b"X-Pad: " + b"a" * 1000 + b"\r\n") * 40,  # 40 kB of headers
        b"HTTP/1.1 200 OK\r\nContent-Length: 90\r\n\r\n{" + SECRET.encode(),  # cut short
    ],
    ids=["not-http", "bad-header", "two-lengths", "endless-headers", "cut-short"],
)
async def test_a_server_answering_what_is_not_http_is_unreachable_and_nothing_it_sent_shows(
    answer: bytes,
) -> None:
    """A real socket answering bytes no HTTP server should: the answer is
    named by its kind only, and the connection is not used again."""
    requests = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fetcher = TokenFetcher()
    try:
        for _ in range(2):
            with pytest.raises(AuthorizationServerUnavailable) as caught:
                await fetcher.fetch(spec_for(f"http://127.0.0.1:{port}/token"), credential())
            assert str(caught.value) == "could not reach the token endpoint: remote protocol error"
            assert_safe(caught.value, "X-Echo", "SMTP", "a" * 100)
        assert requests == 2 and fetcher._poster.open_connections == 0
    finally:
        await fetcher.aclose()
        server.close()


async def test_token_requests_share_kept_connections_at_most_so_many_at_once(
    auth: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One connection serves request after request; 40 at once open no more
    than the cap; one idle past the keep-alive expiry is not used again."""
    monkeypatch.setattr(http11, "MAX_CONNECTIONS", 4)
    network = RecordingNetwork()
    fetcher = TokenFetcher(Egress(network=network))
    endpoint = spec_for(auth.token_endpoint)
    try:
        for _ in range(3):
            await fetcher.fetch(endpoint, credential())
        assert len(network.connects) == 1
        tokens = await asyncio.gather(*(fetcher.fetch(endpoint, credential()) for _ in range(40)))
        assert len({token.access_token for token in tokens}) == 40
        assert len(network.connects) == 4 and fetcher._poster.open_connections == 4
        monkeypatch.setattr(http11, "KEEPALIVE_EXPIRY", -1.0)  # every idle one has expired
        await fetcher.fetch(endpoint, credential())
        assert len(network.connects) == 5 and fetcher._poster.open_connections == 1
    finally:
        await fetcher.aclose()
    assert fetcher._poster.open_connections == 0


async def test_connection_refused_raises_unavailable(fetcher: TokenFetcher) -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

        with pytest.raises(AuthorizationServerUnavailable) as caught:
            await fetcher.fetch(spec_for(f"http://127.0.0.1:{port}/token"), credential())

    assert str(caught.value).startswith("could not reach the token endpoint: ")
    assert caught.value.oauth.status_code == 0
    assert_safe(caught.value)


async def test_a_server_slower_than_the_timeout_raises_unavailable_in_time(
    auth: AuthServer,
) -> None:
    auth.behaviour.delay = 0.8
    fetcher = TokenFetcher(Egress(timeout=0.3))
    loop = asyncio.get_running_loop()
    started = loop.time()

    try:
        with pytest.raises(AuthorizationServerUnavailable) as caught:
            await fetcher.fetch(spec_for(auth.token_endpoint), credential())
    finally:
        await fetcher.aclose()

    assert loop.time() - started < 0.8
    assert "could not reach the token endpoint" in str(caught.value)
    assert auth.token_requests == 1
    assert_safe(caught.value)


async def test_cookies_set_by_the_token_endpoint_are_never_sent_back() -> None:
    """A handler: the real server sets no cookies."""
    cookies: list[str | None] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        cookies.append(request.headers.get("Cookie"))
        return httpx2.Response(
            200,
            json={"access_token": "abc", "expires_in": 60},
            headers={"Set-Cookie": "session=broker-one; Path=/"},
        )

    fetcher = mock_fetcher(handler)
    try:
        await fetcher.fetch(spec_for(MOCK_ENDPOINT), credential())
        await fetcher.fetch(spec_for(MOCK_ENDPOINT, client_id="another"), credential("x"))
    finally:
        await fetcher.aclose()

    assert cookies == [None, None]


async def test_a_gated_request_is_answered_only_once_released(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    auth.behaviour.gate = asyncio.Event()
    fetch = asyncio.ensure_future(fetcher.fetch(spec_for(auth.token_endpoint), credential()))

    await auth.wait_for_requests(1)
    assert not fetch.done()
    assert len(auth.issued) == 1  # decided on arrival; only the answer is held
    auth.behaviour.gate.set()

    assert (await fetch).access_token == auth.issued[0]


async def test_the_demo_server_publishes_metadata_and_keys_that_verify_its_tokens(
    auth: AuthServer, fetcher: TokenFetcher
) -> None:
    token = await fetcher.fetch(spec_for(auth.token_endpoint), credential())
    async with httpx2.AsyncClient() as client:
        metadata = (await client.get(auth.url + "/.well-known/oauth-authorization-server")).json()
        jwks = (await client.get(metadata["jwks_uri"])).json()

    assert metadata["issuer"] == auth.issuer
    assert metadata["token_endpoint"] == auth.token_endpoint
    assert metadata["grant_types_supported"] == ["client_credentials"]
    assert set(metadata["token_endpoint_auth_methods_supported"]) == {
        "client_secret_basic",
        "client_secret_post",
    }
    key = RSAKey.import_key(jwks["keys"][0])
    assert jwt.decode(token.access_token, key, algorithms=["RS256"]).claims["iss"] == auth.issuer


async def test_a_token_response_that_echoes_the_secret_keeps_it_out_of_type_and_scopes() -> None:
    echoed = base64.b64encode(SECRET.encode()).decode()
    token = await mock_fetch(
        lambda r: httpx2.Response(
            200, json={"access_token": "at", "token_type": "Bearer", "scope": f"read {echoed}"}
        )
    )
    assert token.scopes == ("read", "***")
    as_type = base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("=")
    with pytest.raises(InvalidTokenResponse, match="bad token_type"):
        await mock_fetch(
            lambda r: httpx2.Response(200, json={"access_token": "at", "token_type": as_type}),
        )
