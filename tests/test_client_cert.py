"""Client certificates for RFC 8705: checked at registration, never shown."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokensvc.client_cert import CERT_FIELD, KEY_FIELD, bundle, parse
from tokensvc.errors import InvalidArgument

from certs import CertificateAuthority, expired


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


def test_a_certificate_and_its_key_parse_with_subject_and_expiry(ca: CertificateAuthority) -> None:
    issued = ca.client("tokensvc-client")
    parsed = parse(bundle(issued.cert_pem.decode(), issued.key_pem.decode()))
    assert parsed.subject == "CN=tokensvc-client"
    assert parsed.not_after == issued.certificate.not_valid_after_utc
    assert parsed.key_pem.strip() == issued.key_pem.decode().strip()


def test_a_chain_keeps_its_intermediates_in_order(ca: CertificateAuthority) -> None:
    issued = ca.client("leaf")
    chain = issued.cert_pem.decode() + ca.pem.decode()
    parsed = parse(bundle(chain, issued.key_pem.decode()))
    assert parsed.chain_pem.count("BEGIN CERTIFICATE") == 2
    assert parsed.chain_pem.startswith(issued.cert_pem.decode().strip())


def pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, password: bytes | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    ).decode()


@pytest.mark.parametrize(
    ("case", "field", "says"),
    [
        ("another key", KEY_FIELD, "does not belong to the certificate"),
        ("encrypted key", KEY_FIELD, "is encrypted"),
        ("no key", KEY_FIELD, "exactly one PEM private key"),
        ("two keys", KEY_FIELD, "exactly one PEM private key"),
        ("small rsa", KEY_FIELD, "1024 bits"),
        ("no certificate", CERT_FIELD, "not a PEM certificate"),
        ("garbage certificate", CERT_FIELD, "not a valid PEM certificate"),
        ("expired", CERT_FIELD, "expired at"),
        ("not yet valid", CERT_FIELD, "not valid before"),
    ],
)
def test_a_bad_certificate_or_key_is_refused_naming_the_field(
    ca: CertificateAuthority, tmp_path: Path, case: str, field: str, says: str
) -> None:
    issued = ca.client("c")
    cert, key = issued.cert_pem.decode(), issued.key_pem.decode()
    other = pem(ec.generate_private_key(ec.SECP256R1()))
    old = expired(ca, "old")
    now = datetime.now(UTC)
    given = {
        "another key": (cert, other),
        "encrypted key": (cert, pem(ec.generate_private_key(ec.SECP256R1()), b"pw")),
        "no key": (cert, ""),
        "two keys": (cert, key + other),
        "small rsa": (cert, pem(rsa.generate_private_key(65537, 1024))),
        "no certificate": ("", key),
        "garbage certificate": (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----",
            key,
        ),
        "expired": (old.cert_pem.decode(), old.key_pem.decode()),
        "not yet valid": (
            (late := ca.client("late", not_before=now + timedelta(days=1))).cert_pem.decode(),
            late.key_pem.decode(),
        ),
    }[case]
    with pytest.raises(InvalidArgument) as caught:
        parse(bundle(*given))
    assert caught.value.field == field
    assert says in caught.value.message
    assert key.strip() not in str(caught.value)
