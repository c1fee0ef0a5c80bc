"""Client certificates for RFC 8705 mutual-TLS client authentication.

A registration gives a certificate (with any intermediates after it) and its
private key. Both are kept together as one credential, encrypted at rest like
a client secret: ``bundle`` joins them, ``parse`` splits and checks them. The
checks happen at registration, where a mistake can still be named: the key
must be the certificate's, the certificate must be valid now, and the key of a
kind TLS can use.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tokensvc.errors import InvalidArgument

CERT_FIELD = "client_certificate.certificate_pem"
KEY_FIELD = "client_certificate.private_key_pem"
MAX_PEM = 32768
MIN_RSA_BITS = 2048
_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A parsed, checked client certificate; ``chain_pem`` and ``key_pem``
    are what a TLS context loads."""

    chain_pem: str
    key_pem: str = field(repr=False)
    subject: str
    not_after: datetime

    def digest(self) -> bytes:
        """Tells certificates apart, without holding the key: connections made
        presenting one must not serve another's request."""
        return hashlib.sha256(f"{self.chain_pem}\0{self.key_pem}".encode()).digest()


def bundle(certificate_pem: str, private_key_pem: str) -> str:
    """The one string stored (encrypted) for a client certificate credential."""
    return f"{certificate_pem.strip()}\n{private_key_pem.strip()}\n"


def parse(value: str, now: datetime | None = None) -> ClientCertificate:
    """Splits and checks a bundle; raises InvalidArgument naming the field."""
    if len(value) > 2 * MAX_PEM:
        raise InvalidArgument(CERT_FIELD, f"certificate and key exceed {2 * MAX_PEM} characters")
    certs: list[str] = []
    keys: list[str] = []
    for match in _BLOCK.finditer(value):
        (keys if match.group(1).endswith("PRIVATE KEY") else certs).append(match.group(0))
    if not certs or any(not block.startswith("-----BEGIN CERTIFICATE-----") for block in certs):
        raise InvalidArgument(CERT_FIELD, "is not a PEM certificate (-----BEGIN CERTIFICATE-----)")
    if len(keys) != 1:
        raise InvalidArgument(KEY_FIELD, "give exactly one PEM private key, unencrypted")
    try:
        chain = [x509.load_pem_x509_certificate(block.encode()) for block in certs]
    except ValueError:
        raise InvalidArgument(CERT_FIELD, "is not a valid PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(keys[0].encode(), password=None)
    except TypeError:
        raise InvalidArgument(
            KEY_FIELD, "is encrypted: give the key without a passphrase (it is stored encrypted)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument(KEY_FIELD, "is not a PEM-encoded private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidArgument(KEY_FIELD, f"is an RSA key of {key.key_size} bits; use 2048+")
    elif not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise InvalidArgument(KEY_FIELD, "use an RSA, EC or Ed25519 key")
    leaf = chain[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, public) != leaf.public_key().public_bytes(der, public):
        raise InvalidArgument(
            KEY_FIELD, "does not belong to the certificate: give the certificate's own key"
        )
    now = now or datetime.now(UTC)
    if leaf.not_valid_after_utc <= now:
        raise InvalidArgument(
            CERT_FIELD, f"expired at {leaf.not_valid_after_utc.isoformat()}: give a current one"
        )
    if leaf.not_valid_before_utc > now:
        raise InvalidArgument(
            CERT_FIELD, f"is not valid before {leaf.not_valid_before_utc.isoformat()}"
        )
    return ClientCertificate(
        chain_pem="\n".join(certs) + "\n",
        key_pem=keys[0] + "\n",
        subject=leaf.subject.rfc4514_string(),
        not_after=leaf.not_valid_after_utc,
    )
