"""X.509 certificates for tests (mTLS on loopback). Not for production use.

    ca = CertificateAuthority(tmp_path / "ca")
    server = ca.server()                          # serverAuth, SANs 127.0.0.1 + localhost
    client = ca.client("team-a", spiffe_id="spiffe://example.org/broker/team-a")
    stale = expired(ca, "old")                    # clientAuth, not_after one day ago
    alone = self_signed(tmp_path / "ss", "bot")   # clientAuth, its own issuer (RFC 8705 2.2)
    wrong = CertificateAuthority(tmp_path / "other", "unrelated CA")  # a "wrong CA"

Every call writes PEM files into the authority's directory (``ca.pem``,
``ca.key``, ``<name>.pem``, ``<name>.key``) and returns the bytes as well, so a
test can hand either paths (to the service's settings) or bytes (to
``grpc.ssl_*_credentials``) around. Keys are EC P-256, unencrypted PKCS#8.
Certificates are valid from one hour ago (clock skew) for a day unless
``not_before``/``not_after`` say otherwise; a ``not_after`` in the past makes
an expired certificate, which is what :func:`expired` does.

Two authorities made in the same directory would overwrite each other's
``ca.pem``: give each its own directory.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_LIFETIME = timedelta(days=1)
BACKDATE = timedelta(hours=1)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files and as bytes."""

    cert: Path
    key: Path
    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _general_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """IP address SANs for hosts that parse as IP addresses, DNS names otherwise."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class CertificateAuthority:
    """A self-signed CA whose files live in ``directory`` (created if missing)."""

    def __init__(self, directory: Path, name: str = "tokensvc test CA") -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.now(UTC)
        public = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem: bytes = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.key_pem: bytes = _key_pem(self._key)
        self.path: Path = _write(directory / "ca.pem", self.pem)
        self.key_path: Path = _write(directory / "ca.key", self.key_pem)

    def server(
        self,
        name: str = "server",
        *,
        hosts: Sequence[str] = ("127.0.0.1", "localhost"),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        """A serverAuth certificate for ``hosts`` (CN = the first host, or ``name``)."""
        common_name = hosts[0] if hosts else name
        return self._issue(
            name,
            common_name=common_name,
            sans=_general_names(hosts),
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            not_before=not_before,
            not_after=not_after,
        )

    def client(
        self,
        name: str,
        *,
        spiffe_id: str | None = None,
        dns: Sequence[str] = (),
        common_name: str | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> Issued:
        """A clientAuth certificate: URI SAN ``spiffe_id``, DNS SANs ``dns``,
        CN ``common_name`` (default ``name``)."""
        sans: list[x509.GeneralName] = []
        if spiffe_id is not None:
            sans.append(x509.UniformResourceIdentifier(spiffe_id))
        sans.extend(x509.DNSName(host) for host in dns)
        return self._issue(
            name,
            common_name=name if common_name is None else common_name,
            sans=sans,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            not_before=not_before,
            not_after=not_after,
        )

    def _issue(
        self,
        name: str,
        *,
        common_name: str,
        sans: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        not_before: datetime | None,
        not_after: datetime | None,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        start = now - BACKDATE if not_before is None else not_before
        end = now + DEFAULT_LIFETIME if not_after is None else not_after
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            # RFC 5280: critical when the subject is empty; ours never is.
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = _key_pem(key)
        return Issued(
            cert=_write(self.directory / f"{name}.pem", cert_pem),
            key=_write(self.directory / f"{name}.key", key_pem),
            cert_pem=cert_pem,
            key_pem=key_pem,
        )


def expired(ca: CertificateAuthority, name: str, *, spiffe_id: str | None = None) -> Issued:
    """A clientAuth certificate from ``ca`` that expired a day ago (valid for a day before)."""
    now = datetime.now(UTC)
    return ca.client(
        name,
        spiffe_id=spiffe_id,
        not_before=now - timedelta(days=2),
        not_after=now - timedelta(days=1),
    )


def self_signed(directory: Path, name: str) -> Issued:
    """A self-signed clientAuth certificate (RFC 8705 section 2.2), CN ``name``,
    written as ``<name>.pem`` and ``<name>.key`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + DEFAULT_LIFETIME)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = _key_pem(key)
    return Issued(
        cert=_write(directory / f"{name}.pem", cert_pem),
        key=_write(directory / f"{name}.key", key_pem),
        cert_pem=cert_pem,
        key_pem=key_pem,
    )
