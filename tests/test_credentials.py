"""Secret rotation with overlap, and TestServer, over real gRPC against the
real authorization server and the real MCP server."""

from __future__ import annotations

import grpc
import pytest

from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.v1 import tokensvc_pb2 as pb

from support import CLIENT_ID, SECRET, Harness, error_info, registration


async def status(harness: Harness) -> pb.Server:
    return await harness.admin.GetServer(pb.GetServerRequest(id="alpha"))


async def new_secret(harness: Harness, secret: str, **flags: bool) -> pb.Server:
    current = await status(harness)
    request = pb.RegisterServerRequest(server=current, client_secret=secret, **flags)
    return await harness.admin.RegisterServer(request)


async def test_a_new_secret_that_works_drops_the_previous_one(harness: Harness) -> None:
    await harness.register()
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    harness.auth.add_client(CLIENT_ID, "secret-two")  # rotated at the provider
    updated = await new_secret(harness, "secret-two", keep_previous_credential=True)
    assert updated.previous_credential_set
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    after = await status(harness)
    assert not after.previous_credential_set and after.credential_in_use == "current"


async def test_a_wrong_new_secret_falls_back_to_the_previous_one_and_says_so(
    harness: Harness,
) -> None:
    await harness.register()
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    requests = harness.auth.token_requests
    await new_secret(harness, "a-typo", keep_previous_credential=True)
    token = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    assert token.access_token == harness.auth.issued[-1]
    assert harness.auth.token_requests - requests == 2  # the new one refused, the old one used
    after = await status(harness)
    assert after.previous_credential_set and after.credential_in_use == "previous"
    # The admin drops the fallback on purpose: then the refusal shows.
    await harness.admin.RegisterServer(
        pb.RegisterServerRequest(server=after, drop_previous_credential=True)
    )
    dropped = await status(harness)
    assert not dropped.previous_credential_set and dropped.revision == after.revision


async def test_keeping_a_previous_credential_needs_a_new_one(harness: Harness) -> None:
    await harness.register()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.admin.RegisterServer(
            pb.RegisterServerRequest(server=await status(harness), keep_previous_credential=True)
        )
    assert error_info(caught.value).metadata["field"] == "keep_previous_credential"


async def test_test_server_reports_each_step_of_a_working_registration(harness: Harness) -> None:
    async with ProtectedMCPServer(
        issuer=harness.auth.issuer, jwks_uri=harness.auth.jwks_uri
    ) as mcp:
        await harness.register(mcp_url=mcp.url)
        served = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
        stored_before = harness.auth.token_requests
        result = await harness.admin.TestServer(pb.TestServerRequest(id="alpha", call_mcp=True))
        assert result.ok, result
        assert [s.name for s in result.steps] == [
            "token_request",
            "mcp_initialize",
            "mcp_list_tools",
        ]
        assert result.steps[2].tool_count >= 2
        assert harness.auth.token_requests >= stored_before + 1
        wire = result.SerializeToString()
        assert SECRET.encode() not in wire
        assert all(token.encode() not in wire for token in harness.auth.issued)
        # Nothing stored by the test: the served token is still the one before it.
        again = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
        assert again.access_token == served.access_token != harness.auth.issued[-1]
        assert (await status(harness)).status.token_version == served.version


async def test_test_server_shows_where_a_broken_registration_fails(harness: Harness) -> None:
    broken = registration(harness.auth, "broken", "not-the-secret")
    result = await harness.admin.TestServer(pb.TestServerRequest(registration=broken))
    assert not result.ok
    (step,) = result.steps
    assert step.name == "token_request" and not step.ok
    assert (step.reason, step.error, step.http_status) == (
        "CREDENTIALS_REJECTED",
        "invalid_client",
        401,
    )
    assert b"not-the-secret" not in result.SerializeToString()
    assert list((await harness.admin.ListServers(pb.ListServersRequest())).servers) == []


async def test_test_server_catches_a_token_the_mcp_server_refuses(harness: Harness) -> None:
    async with ProtectedMCPServer(
        issuer=harness.auth.issuer, jwks_uri=harness.auth.jwks_uri
    ) as mcp:
        # A resource that is not the MCP server's URL: the token's audience is wrong.
        await harness.register(mcp_url=mcp.url, resource="http://127.0.0.1:9/elsewhere")
        result = await harness.admin.TestServer(pb.TestServerRequest(id="alpha", call_mcp=True))
    assert not result.ok
    assert [(s.name, s.ok) for s in result.steps] == [
        ("token_request", True),
        ("mcp_initialize", False),
    ]
    assert result.steps[1].http_status == 401


async def test_test_server_discovers_when_the_registration_says_only_the_mcp_url(
    harness: Harness,
) -> None:
    async with ProtectedMCPServer(
        issuer=harness.auth.issuer, jwks_uri=harness.auth.jwks_uri
    ) as mcp:
        found = registration(harness.auth, "found", mcp_url=mcp.url, token_endpoint="")
        result = await harness.admin.TestServer(
            pb.TestServerRequest(registration=found, call_mcp=True)
        )
    assert result.ok, result
    assert [s.name for s in result.steps][:2] == ["discovery", "token_request"]


def pem_of(key: object, password: bytes | None = None) -> str:
    from cryptography.hazmat.primitives import serialization

    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    ).decode()


def bad_keys() -> list[tuple[str, str, str, str]]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return [
        ("garbage", "not a key", "", "PEM-encoded"),
        ("ed25519", pem_of(ed25519.Ed25519PrivateKey.generate()), "", "RSA or EC"),
        (
            "rsa-1024",
            pem_of(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "",
            "at least 2048",
        ),
        ("encrypted", pem_of(rsa_key, b"passphrase"), "", "passphrase"),
        ("ec-with-rs256", pem_of(ec.generate_private_key(ec.SECP256R1())), "RS256", "ES256"),
        ("unknown-alg", pem_of(rsa_key), "HS256", "RS256"),
    ]


@pytest.mark.parametrize(("name", "pem", "alg", "hint"), bad_keys(), ids=[k[0] for k in bad_keys()])
async def test_bad_private_keys_are_refused_at_registration_saying_what_is_wrong(
    harness: Harness, name: str, pem: str, alg: str, hint: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.register("keyed", None, signing_alg=alg, private_key_pem=pem)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] in ("private_key_pem", "server.signing_alg")
    assert hint in (caught.value.details() or "")
    assert "PRIVATE KEY" not in (caught.value.details() or "")


async def test_a_private_key_registers_for_private_key_jwt_and_is_never_returned(
    harness: Harness,
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = pem_of(ec.generate_private_key(ec.SECP256R1()))
    server = await harness.register("keyed", None, key_id="k1", private_key_pem=pem)
    assert server.credential_set and server.key_id == "k1"
    assert server.effective_auth_method == pb.CLIENT_AUTH_METHOD_PRIVATE_KEY_JWT
    listed = await harness.admin.ListServers(pb.ListServersRequest())
    for wire in (server.SerializeToString(), listed.SerializeToString()):
        assert b"PRIVATE KEY" not in wire
