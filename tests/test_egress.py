"""Where outbound requests may go, checked by address at the connect itself.

Every test here resolves through a scripted resolver and connects through a
network that records every address and really connects only to loopback: no
test sends a packet off this host, whatever the policy would have allowed.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tokensvc.demo.authserver import AuthServer
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.egress import UrlPolicy, embedded_ipv4, parse_networks
from tokensvc.errors import InvalidArgument, TokenRequestRejected
from tokensvc.oauth import TokenFetcher
from tokensvc.registration import Credential, CredentialKind, ServerSpec
from tokensvc.settings import Settings
from tokensvc.token import Secret
from tokensvc.v1 import tokensvc_pb2 as pb

from support import (
    CLIENT_ID,
    SECRET,
    RecordingNetwork,
    ScriptedResolver,
    running_service,
    scripted_egress,
)

PUBLIC = "93.184.216.34"
METADATA_FORMS = [
    "169.254.169.254",
    "169.254.170.2",
    "fd00:ec2::254",
    "fd20:ce::254",
    "100.100.100.200",
    "192.0.0.192",
    "168.63.129.16",
    "64:ff9b::a9fe:a9fe",  # NAT64
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64
    "2002:a9fe:a9fe::1",  # 6to4
    "::a9fe:a9fe",  # IPv4-compatible
    "::ffff:169.254.169.254",  # IPv4-mapped
    "::ffff:100.100.100.200",
    "64:ff9b::6464:64c8",  # NAT64 of Alibaba's
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo, client 169.254.169.254
    "fe80::1",
    "0.0.0.0",
    "::",
    "224.0.0.251",
    "ff02::1",
    "255.255.255.255",
]


def literal(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def credential() -> Credential:
    return Credential(CredentialKind.CLIENT_SECRET, Secret(SECRET))


def spec(token_endpoint: str) -> ServerSpec:
    return ServerSpec("alpha", "https://mcp.example.com/mcp", token_endpoint, CLIENT_ID)


@pytest.fixture
def network() -> RecordingNetwork:
    return RecordingNetwork()


@pytest.mark.parametrize("insecure", [False, True], ids=["default", "allow-insecure-http"])
@pytest.mark.parametrize("scheme", ["https", "http"])
@pytest.mark.parametrize("address", METADATA_FORMS)
async def test_every_metadata_form_is_refused_as_a_literal_and_behind_a_name(
    network: RecordingNetwork, address: str, scheme: str, insecure: bool
) -> None:
    resolver = ScriptedResolver(metadata_example_com=[[address]])
    egress = scripted_egress(resolver, network, allow_insecure_http=insecure)
    with pytest.raises(InvalidArgument, match="always refused"):
        egress.policy.check_syntax("server.token_endpoint", f"{scheme}://{literal(address)}/t")
    with pytest.raises(InvalidArgument, match="always refused"):
        await egress.policy.check("server.token_endpoint", f"{scheme}://metadata.example.com/t")
    with pytest.raises(InvalidArgument, match=r"could not be fetched: .*always refused"):
        await egress.get(f"{scheme}://metadata.example.com/latest", "server.issuer")
    await egress.aclose()
    assert network.connects == []


def test_embedded_ipv4_addresses_are_found_in_every_ipv6_form() -> None:
    target = ipaddress.IPv4Address("169.254.169.254")
    for form in METADATA_FORMS[7:15]:
        address = ipaddress.ip_address(form)
        assert isinstance(address, ipaddress.IPv6Address)
        assert embedded_ipv4(address) and (
            target in embedded_ipv4(address) or address.ipv4_mapped or "6464" in form
        ), form


async def test_a_resolver_answering_public_then_metadata_never_gets_a_connect(
    network: RecordingNetwork,
) -> None:
    """DNS rebinding: the name passes the check at registration, then points
    at the metadata service. The connect resolves once, itself, and refuses."""
    resolver = ScriptedResolver(as_example_com=[[PUBLIC], ["169.254.169.254"]])
    egress = scripted_egress(resolver, network)
    url = "https://as.example.com/token"
    await egress.policy.check("server.token_endpoint", url)  # registration: public
    fetcher = TokenFetcher(egress)
    with pytest.raises(TokenRequestRejected, match="metadata") as caught:
        await fetcher.fetch(spec(url), credential())
    assert "169.254.169.254" in caught.value.message
    # The same for a discovery GET, and a redirect hop.
    resolver.script("issuer.example.com", [PUBLIC], ["100.100.100.200"])
    await egress.policy.check("server.issuer", "https://issuer.example.com")
    with pytest.raises(InvalidArgument, match="always refused"):
        await egress.get("https://issuer.example.com/.well-known/x", "server.issuer")
    await fetcher.aclose()
    await egress.aclose()
    assert network.connects == []
    assert resolver.lookups == ["as.example.com"] * 2 + ["issuer.example.com"] * 2


async def test_a_request_connects_to_the_address_that_was_checked_once_per_connection(
    network: RecordingNetwork, auth: AuthServer
) -> None:
    port = int(auth.token_endpoint.rsplit(":", 1)[1].split("/")[0])
    # Even "localhost" is only a name: what it resolves to is checked.
    resolver = ScriptedResolver(localhost=[["127.0.0.1"], ["169.254.169.254"]])
    egress = scripted_egress(resolver, network)
    fetcher = TokenFetcher(egress)
    url = f"http://localhost:{port}/token"
    first = await fetcher.fetch(spec(url), credential())
    second = await fetcher.fetch(spec(url), credential())  # the same connection
    assert first.access_token != second.access_token
    assert network.connects == ["127.0.0.1"] and resolver.lookups == ["localhost"]
    await fetcher.aclose()
    again = TokenFetcher(egress)  # a new connection resolves again: now metadata
    with pytest.raises(TokenRequestRejected, match="metadata"):
        await again.fetch(spec(url), credential())
    await again.aclose()
    await egress.aclose()
    assert network.connects == ["127.0.0.1"] and resolver.lookups == ["localhost"] * 2


async def test_loopback_is_an_address_not_a_name(network: RecordingNetwork) -> None:
    resolver = ScriptedResolver(evil_localhost=[["10.0.0.5"]], localhost=[["127.0.0.1", "::1"]])
    egress = scripted_egress(resolver, network)
    with pytest.raises(InvalidArgument, match=r"loopback addresses.*10\.0\.0\.5"):
        await egress.policy.check("server.token_endpoint", "http://evil.localhost:8080/token")
    fetcher = TokenFetcher(egress)
    with pytest.raises(TokenRequestRejected, match=r"must use https.*10\.0\.0\.5"):
        await fetcher.fetch(spec("http://evil.localhost:8080/token"), credential())
    await egress.policy.check("server.token_endpoint", "http://localhost:8080/token")
    await fetcher.aclose()
    await egress.aclose()
    assert network.connects == []


def test_operators_refuse_networks_and_carve_exceptions_out_of_them() -> None:
    policy = UrlPolicy(
        refuse=parse_networks("10.0.0.0/8, fc00::/7", "egress_refuse"),
        allow=parse_networks("10.1.0.0/16", "egress_allow"),
    )
    for refused in ("10.2.3.4", "fd12::1", "::ffff:10.2.3.4", "64:ff9b::a02:304"):
        with pytest.raises(InvalidArgument, match="refuses"):
            policy.check_address("server.issuer", ipaddress.ip_address(refused), "https")
    policy.check_address("server.issuer", ipaddress.ip_address("10.1.2.3"), "https")
    # An allowed network never opens what is always refused.
    opened = UrlPolicy(allow=parse_networks("169.254.0.0/16", "egress_allow"))
    with pytest.raises(InvalidArgument, match="always refused"):
        opened.check_address("server.issuer", ipaddress.ip_address("169.254.169.254"), "https")
    with pytest.raises(ValueError, match=r"egress_refuse: '10\.0\.0\.0/33'"):
        parse_networks("10.0.0.0/33", "egress_refuse")
    settings = Settings(egress_refuse="192.168.0.0/16", egress_allow="192.168.7.0/24")
    assert settings.url_policy.refuse == (ipaddress.ip_network("192.168.0.0/16"),)


async def test_test_server_mcp_calls_go_through_the_pinned_egress(
    tmp_path: Path, network: RecordingNetwork, auth: AuthServer
) -> None:
    async with ProtectedMCPServer(issuer=auth.issuer, jwks_uri=auth.jwks_uri) as mcp:
        port = mcp.url.split(":")[2].split("/")[0]
        mcp_url = f"http://localhost:{port}/mcp"
        resolver = ScriptedResolver(localhost=[["127.0.0.1"]])
        egress = scripted_egress(resolver, network)
        async with running_service(tmp_path / "data", auth, egress=egress) as harness:
            await harness.register(mcp_url=mcp_url, resource=mcp.url)
            tested = await harness.admin.TestServer(pb.TestServerRequest(id="alpha", call_mcp=True))
            assert tested.ok, tested
            assert "localhost" in resolver.lookups
            registration = pb.RegisterServerRequest(
                server=pb.Server(
                    id="beta",
                    mcp_url=f"http://localhost:{port}/other",
                    token_endpoint=auth.token_endpoint,
                    client_id=CLIENT_ID,
                    resource=mcp.url,
                ),
                client_secret=SECRET,
            )
            # Rebound after the registration's check: the MCP connect would reach metadata.
            resolver.script("localhost", ["127.0.0.1"], ["169.254.169.254"])
            resolver.lookups.clear()
            failed = await harness.admin.TestServer(
                pb.TestServerRequest(registration=registration, call_mcp=True)
            )
    assert [(s.name, s.ok) for s in failed.steps] == [
        ("token_request", True),
        ("mcp_initialize", False),
    ]
    assert "metadata" in failed.steps[1].detail, failed.steps[1]
    assert network.off_loopback == []
    assert set(network.connects) == {"127.0.0.1"}
