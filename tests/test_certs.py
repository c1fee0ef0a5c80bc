"""Self-check of tests/certs.py, and mTLS with grpc.aio on loopback: what the
server sees of a client certificate, which clients it refuses, and certificate
rotation without a restart (``grpc.dynamic_ssl_server_credentials``)."""

from __future__ import annotations

import ipaddress
import pprint
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from certs import CertificateAuthority, Issued, expired

SPIFFE_ID = "spiffe://example.org/broker/team-a"
TIMEOUT = 5.0  # seconds per RPC


def test_server_certificate_verifies_against_its_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.server()
    assert ca.path.read_bytes() == ca.pem
    assert server.cert.read_bytes() == server.cert_pem
    trusting_ca = PolicyBuilder().store(Store([ca.certificate]))
    for subject in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = trusting_ca.build_server_verifier(subject).verify(server.certificate, [])
        assert chain == [server.certificate, ca.certificate]

    wrong = CertificateAuthority(tmp_path / "wrong", "unrelated CA")
    trusting_wrong = PolicyBuilder().store(Store([wrong.certificate]))
    with pytest.raises(VerificationError):
        trusting_wrong.build_server_verifier(x509.DNSName("localhost")).verify(
            server.certificate, []
        )


def test_client_certificate_carries_spiffe_id_and_client_auth(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    client = ca.client("team-a", spiffe_id=SPIFFE_ID, dns=["broker.example.org"])
    cert = client.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_ID]
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.rfc4514_string() == "CN=team-a"
    verified = (
        PolicyBuilder().store(Store([ca.certificate])).build_client_verifier().verify(cert, [])
    )
    assert verified.subjects is not None
    assert x509.UniformResourceIdentifier(SPIFFE_ID) in verified.subjects

    stale = expired(ca, "old")
    assert stale.certificate.not_valid_after_utc < datetime.now(UTC)


# --- real gRPC TLS on loopback -----------------------------------------------


class RecordingHealth(health_aio.HealthServicer):  # type: ignore[misc]
    """The standard health service, remembering what each Check saw of its peer."""

    def __init__(self) -> None:
        super().__init__()
        self.auth_contexts: list[dict[str, list[bytes]]] = []
        self.peer_identities: list[Any] = []

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.auth_contexts.append(context.auth_context())
        self.peer_identities.append((context.peer_identity_key(), context.peer_identities()))
        return await super().Check(request, context)


@asynccontextmanager
async def serve(credentials: grpc.ServerCredentials) -> AsyncIterator[tuple[int, RecordingHealth]]:
    server = grpc.aio.server()
    servicer = RecordingHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(None)


async def check(port: int, root: bytes, client: Issued | None) -> int:
    """Health/Check over a new channel (and connection); the serving status."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    # A local subchannel pool: this channel gets its own connection rather than
    # sharing one with an earlier channel of equal target and arguments.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        return int(response.status)


SERVING = health_pb2.HealthCheckResponse.SERVING


async def refused(call: Awaitable[Any]) -> grpc.StatusCode:
    """The status code of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    print(f"refused: {caught.value.code()} {caught.value.details()!r}")
    return caught.value.code()


async def test_mtls_health_check_and_client_identity(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.server()
    client = ca.client("team-a", spiffe_id=SPIFFE_ID, dns=["broker.example.org"])
    credentials = grpc.ssl_server_credentials(
        [(server.key_pem, server.cert_pem)], root_certificates=ca.pem, require_client_auth=True
    )
    async with serve(credentials) as (port, servicer):
        assert await check(port, ca.pem, client) == SERVING

        auth = servicer.auth_contexts[-1]
        print("\nauth_context():")
        pprint.pprint(auth, width=100)
        print("peer_identity_key(), peer_identities():", servicer.peer_identities[-1])

        # The SANs, flattened and untyped (URI, DNS, ... all alike).
        sans = auth.get("x509_subject_alternative_name", [])
        # Or typed, from the certificate itself.
        cert = x509.load_pem_x509_certificate(auth["x509_pem_cert"][0])
        uris = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        assert SPIFFE_ID.encode() in sans or uris == [SPIFFE_ID]
        assert uris == [SPIFFE_ID]
        assert auth["transport_security_type"] == [b"ssl"]

        wrong = CertificateAuthority(tmp_path / "wrong", "unrelated CA")
        outsider = wrong.client("outsider", spiffe_id=SPIFFE_ID)
        stale = expired(ca, "stale", spiffe_id=SPIFFE_ID)
        for name, who in (("other CA", outsider), ("expired", stale), ("no cert", None)):
            print(f"client with {name}: ", end="")
            code = await refused(check(port, ca.pem, who))
            assert code == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA refuses the server.
        print("client trusting another CA: ", end="")
        assert await refused(check(port, wrong.pem, client)) == grpc.StatusCode.UNAVAILABLE
        assert len(servicer.auth_contexts) == 1  # no refused call reached the servicer


async def test_dynamic_credentials_rotate_server_certificate(tmp_path: Path) -> None:
    """A new server certificate from a second CA, picked up by new connections."""
    old_ca = CertificateAuthority(tmp_path / "old", "old server CA")
    new_ca = CertificateAuthority(tmp_path / "new", "new server CA")
    client_ca = CertificateAuthority(tmp_path / "clients", "client CA")
    client = client_ca.client("team-a", spiffe_id=SPIFFE_ID)
    old, new = old_ca.server("old"), new_ca.server("new")

    def configuration(issued: Issued) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(issued.key_pem, issued.cert_pem)], root_certificates=client_ca.pem
        )

    pending: list[grpc.ServerCertificateConfiguration] = []
    fetches = 0

    def fetcher() -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before every TLS handshake; None keeps the current one.
        nonlocal fetches
        fetches += 1
        return pending.pop() if pending else None

    credentials = grpc.dynamic_ssl_server_credentials(
        configuration(old), fetcher, require_client_authentication=True
    )
    async with serve(credentials) as (port, _):
        # A channel whose connection is made before the rotation and kept after it.
        kept = grpc.aio.secure_channel(
            f"127.0.0.1:{port}",
            grpc.ssl_channel_credentials(old_ca.pem, client.key_pem, client.cert_pem),
            [("grpc.use_local_subchannel_pool", 1)],
        )
        kept_stub = health_pb2_grpc.HealthStub(kept)
        request = health_pb2.HealthCheckRequest()
        assert (await kept_stub.Check(request, timeout=TIMEOUT)).status == SERVING
        assert await check(port, old_ca.pem, client) == SERVING
        assert await refused(check(port, new_ca.pem, client)) == grpc.StatusCode.UNAVAILABLE
        before = fetches
        assert before >= 2

        pending.append(configuration(new))
        assert await check(port, new_ca.pem, client) == SERVING
        assert not pending  # the fetcher handed it over
        assert await refused(check(port, old_ca.pem, client)) == grpc.StatusCode.UNAVAILABLE
        assert await check(port, new_ca.pem, client) == SERVING
        # The connection made under the old certificate is not dropped.
        assert (await kept_stub.Check(request, timeout=TIMEOUT)).status == SERVING
        await kept.close()
        print(f"fetcher calls: {fetches} ({fetches - before} after the rotation)")
