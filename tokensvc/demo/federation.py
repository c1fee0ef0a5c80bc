"""Workload identity federation for the demo authorization server: the platforms
it trusts, and the workload a valid platform JWT names.

A federated client has no secret: a JWT its platform issued is its credential,
sent as its client assertion (as Entra ID takes it) or as a jwt-bearer grant
(SEP-1933).
"""

from __future__ import annotations

import json

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

FEDERATED = "federated_assertion"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Platforms:
    """The platform issuers trusted, each with its keys and the audience it must name."""

    def __init__(self) -> None:
        self._trusted: dict[str, tuple[KeySet, str]] = {}

    def __bool__(self) -> bool:
        """Any platform is trusted (then the metadata offers federation)."""
        return bool(self._trusted)

    def trust(self, issuer: str, jwks: KeySet, audience: str) -> None:
        self._trusted[issuer] = (jwks, audience)

    def workload_of(self, assertion: str) -> tuple[str, str] | None:
        """The (issuer, subject) of a valid platform JWT, or None: signature,
        issuer, audience, expiry and subject all checked."""
        try:
            # The issuer picks the keys; until they have verified it, it is only a hint.
            issuer = json.loads(jws.extract_compact(assertion.encode()).payload)["iss"]
            jwks, audience = self._trusted[issuer]
            token = jwt.decode(assertion, jwks)
            JWTClaimsRegistry(
                iss={"essential": True, "value": issuer},
                aud={"essential": True, "value": audience},
                exp={"essential": True},
                sub={"essential": True},
            ).validate(token.claims)
        except (JoseError, KeyError, TypeError, ValueError):
            return None
        return issuer, str(token.claims["sub"])
