"""``python -m tokensvc.healthcheck [--alive] [HOST:PORT]``: exit 0 if grpc.health.v1
says SERVING; with ``--alive``, if it answers at all (SERVING or NOT_SERVING: a
process that lost its database still serves valid tokens from memory, and
restarting it would lose them).

For container HEALTHCHECKs, which have no grpcurl. Without an address it asks
the listener that ``tokensvc serve`` would open with the same settings
(``TOKENSVC_LISTEN``, ``TOKENSVC_CONFIG``; a wildcard host is reached on
loopback). Speaks TLS when ``TOKENSVC_TLS_CERT`` is set (trusting that
certificate, whatever name it was issued for); with mTLS it presents
``TOKENSVC_HEALTHCHECK_CERT`` and ``TOKENSVC_HEALTHCHECK_KEY`` when given.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokensvc.errors import ConfigurationError
from tokensvc.settings import healthcheck_files, load


def _channel(target: str) -> grpc.Channel:
    files = healthcheck_files()
    if not files.tls_cert:
        return grpc.insecure_channel(target)
    pem = Path(files.tls_cert).read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    client_cert, client_key = files.client_cert, files.client_key
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pem,
        private_key=Path(client_key).read_bytes() if client_key else None,
        certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", str(names[0].value))] if names else []
    return grpc.secure_channel(target, credentials, options=options)


def main(argv: list[str]) -> int:
    args = argv[1:]
    alive = "--alive" in args
    args = [a for a in args if a != "--alive"]
    if args:
        target = args[0]
    else:
        try:
            target = load().health_target
        except ConfigurationError as exc:
            print(f"unhealthy: {exc.message}", file=sys.stderr)
            return 1
    with _channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if alive or response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
