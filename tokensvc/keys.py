"""Private keys for private_key_jwt (RFC 7523 section 2.2): checked once at
registration, imported once per process, and used to sign client assertions.

Importing a PEM costs tens of milliseconds of CPU (the event loop's, if done
per request, as authlib does): each distinct key is imported once and kept.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from tokensvc.errors import InvalidArgument

ASSERTION_LIFETIME = timedelta(minutes=5)
MIN_RSA_BITS = 2048
CURVE_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
RSA_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


@dataclass(frozen=True, slots=True)
class SigningKey:
    key: RSAKey | ECKey
    default_alg: str

    def allows(self, alg: str) -> bool:
        if isinstance(self.key, RSAKey):
            return alg in RSA_ALGS
        return alg == self.default_alg


def check_private_key(pem: str, alg: str = "", field: str = "private_key_pem") -> SigningKey:
    """Parses and checks a PEM private key; raises InvalidArgument saying what is wrong."""
    try:
        loaded = serialization.load_pem_private_key(pem.encode(), password=None)
    except TypeError:
        raise InvalidArgument(
            field, "is encrypted: give the key without a passphrase (it is stored encrypted)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidArgument(
            field, "is not a PEM-encoded private key (PKCS#8 or traditional): give an RSA or EC key"
        ) from None
    if isinstance(loaded, rsa.RSAPrivateKey):
        if loaded.key_size < MIN_RSA_BITS:
            raise InvalidArgument(
                field,
                f"is an RSA key of {loaded.key_size} bits; at least {MIN_RSA_BITS} are needed",
            )
        key = _import(pem, "RSA")
        default = "RS256"
    elif isinstance(loaded, ec.EllipticCurvePrivateKey):
        if loaded.curve.name not in CURVE_ALGS:
            raise InvalidArgument(
                field, f"uses curve {loaded.curve.name}; use P-256, P-384 or P-521"
            )
        key = _import(pem, "EC")
        default = CURVE_ALGS[loaded.curve.name]
    else:
        raise InvalidArgument(
            field, f"is a {type(loaded).__name__.removeprefix('_')} key; use an RSA or EC key"
        )
    signing = SigningKey(key, default)
    if alg and not signing.allows(alg):
        fitting = RSA_ALGS if isinstance(key, RSAKey) else (default,)
        raise InvalidArgument(
            "server.signing_alg",
            f"{alg!r} does not fit this key: use {', '.join(fitting)}",
        )
    return signing


@functools.lru_cache(maxsize=256)
def _import(pem: str, kind: str) -> RSAKey | ECKey:
    return RSAKey.import_key(pem) if kind == "RSA" else ECKey.import_key(pem)


@functools.lru_cache(maxsize=256)
def signing_key(pem: str) -> SigningKey:
    """The key of a stored (already checked) PEM, imported once."""
    return check_private_key(pem)


def client_assertion(
    pem: str,
    client_id: str,
    audience: str,
    now: datetime,
    alg: str = "",
    key_id: str = "",
) -> str:
    """A client assertion: iss = sub = client_id, aud, jti, iat, exp (5 minutes)."""
    signing = signing_key(pem)
    header = {"alg": alg or signing.default_alg, "typ": "JWT"}
    if key_id:
        header["kid"] = key_id
    issued = int(now.timestamp())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": secrets.token_urlsafe(16),
        "iat": issued,
        "exp": issued + int(ASSERTION_LIFETIME.total_seconds()),
    }
    return jwt.encode(header, claims, signing.key, algorithms=[header["alg"]])
