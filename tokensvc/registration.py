"""What an admin registers: the server's OAuth settings and its credential.

Every field that arrives from a caller is validated here, before anything is
stored; a rejection names the request field and what would be accepted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from tokensvc import client_cert
from tokensvc.assertions import AssertionDir
from tokensvc.egress import MAX_URL, UrlPolicy
from tokensvc.errors import InvalidArgument
from tokensvc.keys import RSA_ALGS, check_private_key
from tokensvc.token import Secret

SIGNING_ALGS = (*RSA_ALGS, "ES256", "ES384", "ES512")
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MAX_CLIENT_ID = 512
MAX_SECRET = 4096
MAX_PRIVATE_KEY = 16384
MAX_SCOPES = 64
MAX_SCOPE = 256
MAX_PARAMS = 32
MAX_PARAM_KEY = 128
MAX_PARAM_VALUE = 2048
# RFC 6749 appendix A.4: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
PARAM_KEY = re.compile(r"[A-Za-z0-9_.:-]+")
# Parameters tokensvc sets itself; an extra param may not override them.
RESERVED_PARAMS = frozenset(
    {
        "grant_type",
        "scope",
        "resource",
        "audience",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
    }
)


class AuthMethod(StrEnum):
    UNSPECIFIED = ""  # chosen from discovery and the credential
    CLIENT_SECRET_BASIC = "client_secret_basic"
    CLIENT_SECRET_POST = "client_secret_post"
    PRIVATE_KEY_JWT = "private_key_jwt"
    TLS_CLIENT_AUTH = "tls_client_auth"  # RFC 8705 section 2.1
    SELF_SIGNED_TLS_CLIENT_AUTH = "self_signed_tls_client_auth"  # RFC 8705 section 2.2
    FEDERATED_ASSERTION = "federated_assertion"  # a platform JWT as client_assertion
    NONE = "none"  # the jwt-bearer grant: the assertion is the grant


class GrantType(StrEnum):
    CLIENT_CREDENTIALS = ""  # RFC 6749 section 4.4
    JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"  # RFC 7523 section 2.1


class AssertionAudience(StrEnum):
    UNSPECIFIED = ""  # the issuer when known, else the token endpoint
    ISSUER = "issuer"
    TOKEN_ENDPOINT = "token_endpoint"


class CredentialKind(StrEnum):
    CLIENT_SECRET = "client_secret"
    PRIVATE_KEY = "private_key"
    CLIENT_CERTIFICATE = "client_certificate"  # certificate and key PEM, one after the other
    ASSERTION_FILE = "assertion_file"  # a file name in the assertion directory; not secret


# Which client authentication methods each kind of credential can serve, the
# first one preferred when the authorization server does not say.
METHODS_OF_KIND: dict[CredentialKind, tuple[AuthMethod, ...]] = {
    CredentialKind.CLIENT_SECRET: (AuthMethod.CLIENT_SECRET_BASIC, AuthMethod.CLIENT_SECRET_POST),
    CredentialKind.PRIVATE_KEY: (AuthMethod.PRIVATE_KEY_JWT,),
    CredentialKind.CLIENT_CERTIFICATE: (
        AuthMethod.TLS_CLIENT_AUTH,
        AuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH,
    ),
    CredentialKind.ASSERTION_FILE: (AuthMethod.FEDERATED_ASSERTION,),
}
MTLS_METHODS = frozenset({AuthMethod.TLS_CLIENT_AUTH, AuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH})
# How discovery metadata (token_endpoint_auth_methods_supported) names them:
# a federated assertion is an RFC 7523 client assertion, "private_key_jwt" on
# the wire.
WIRE_NAMES = {AuthMethod.FEDERATED_ASSERTION: "private_key_jwt"}


class PreviousCredential(StrEnum):
    """What a registration that replaces the credential does with the old one."""

    UNCHANGED = ""  # a kept fallback stays until the next credential change
    KEEP = "keep"  # keep the replaced credential as a fallback
    DROP = "drop"  # drop a kept fallback now


@dataclass(frozen=True, slots=True)
class Credential:
    kind: CredentialKind
    value: Secret


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """What may be shown of a credential: never the credential itself."""

    kind: CredentialKind
    expire_time: datetime | None = None  # a client certificate's notAfter
    certificate_subject: str = ""
    assertion_file: str = ""

    @staticmethod
    def of(credential: Credential) -> CredentialInfo:
        kind, value = credential.kind, credential.value.reveal()
        if kind is CredentialKind.CLIENT_CERTIFICATE:
            parsed = client_cert.parse(value)
            return CredentialInfo(kind, parsed.not_after, parsed.subject)
        if kind is CredentialKind.ASSERTION_FILE:
            return CredentialInfo(kind, assertion_file=value)
        return CredentialInfo(kind)

    def to_json(self) -> str:
        expires = self.expire_time.isoformat() if self.expire_time else None
        return json.dumps(
            {
                "expire_time": expires,
                "certificate_subject": self.certificate_subject,
                "assertion_file": self.assertion_file,
            }
        )

    @staticmethod
    def from_json(kind: CredentialKind, text: str | None) -> CredentialInfo:
        data = json.loads(text) if text else {}
        expires = data.get("expire_time")
        return CredentialInfo(
            kind,
            datetime.fromisoformat(expires) if expires else None,
            data.get("certificate_subject", ""),
            data.get("assertion_file", ""),
        )


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """A server's registration, as given (``resource`` empty means ``mcp_url``)."""

    id: str
    mcp_url: str
    token_endpoint: str
    client_id: str
    issuer: str = ""
    auth_method: AuthMethod = AuthMethod.UNSPECIFIED
    scopes: tuple[str, ...] = ()
    resource: str = ""
    audience: str = ""
    extra_token_params: tuple[tuple[str, str], ...] = field(default=())
    # When to refresh, as a share of the lifetime; 0: the service default.
    # Not part of what a token is fetched with, so changing it keeps the revision.
    refresh_fraction: float = 0.0
    # private_key_jwt only.
    key_id: str = ""
    signing_alg: str = ""
    assertion_audience: AssertionAudience = AssertionAudience.UNSPECIFIED
    grant_type: GrantType = GrantType.CLIENT_CREDENTIALS

    @property
    def effective_resource(self) -> str:
        return self.resource or self.mcp_url

    @property
    def params(self) -> dict[str, str]:
        return dict(self.extra_token_params)


# Fields a token is not fetched with: changing them keeps the revision (and
# the token). Any other change, the credential's included, bumps it.
NON_REVISION_FIELDS = frozenset({"refresh_fraction", "previous_credential"})


@dataclass(frozen=True, slots=True)
class RevisionPlan:
    """What a registration changes in a stored server."""

    fields: tuple[str, ...]  # what changed, as audited
    keep_old_credential: bool  # store the replaced credential as the fallback

    @property
    def changed(self) -> bool:
        return bool(self.fields)

    @property
    def revised(self) -> bool:
        """The revision moves: tokens fetched before are void."""
        return any(name not in NON_REVISION_FIELDS for name in self.fields)

    @property
    def drops_previous(self) -> bool:
        """A stored fallback is dropped (unless the old credential replaces it)."""
        return "previous_credential" in self.fields


def plan_revision(
    old: ServerSpec,
    new: ServerSpec,
    *,
    credential_changed: bool,
    discovery_changed: bool,
    holds_previous: bool,
    previous: PreviousCredential,
) -> RevisionPlan:
    """The revision rules: which fields changed, and whether the revision moves.

    Any change a token is fetched with, the credential's included, moves it;
    ``refresh_fraction`` and the fallback credential do not.
    """
    fields = [name for name in ServerSpec.__slots__ if getattr(old, name) != getattr(new, name)]
    if credential_changed:
        fields.append("credential")
    if discovery_changed:
        fields.append("discovery")
    keep = previous is PreviousCredential.KEEP and credential_changed
    if keep or (previous is PreviousCredential.DROP and holds_previous):
        fields.append("previous_credential")
    return RevisionPlan(tuple(fields), keep)


def sorted_params(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(params.items()))


def validate_server_id(value: str, field_name: str = "id") -> str:
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            field_name,
            f"{value[:80]!r} is not a valid server id: use 1 to 63 characters of a-z, 0-9, "
            "'.', '_' and '-', starting with a letter or digit",
        )
    return value


def _check_text(field_name: str, value: str, limit: int, what: str) -> None:
    if len(value) > limit:
        raise InvalidArgument(field_name, f"is longer than {limit} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidArgument(field_name, f"contains control characters; give a plain {what}")


async def validate_spec(spec: ServerSpec, policy: UrlPolicy, prefix: str = "server.") -> ServerSpec:
    """Validates every field; raises InvalidArgument naming the first bad one."""
    validate_server_id(spec.id, prefix + "id")
    await policy.check(prefix + "mcp_url", spec.mcp_url)
    if spec.token_endpoint:
        await policy.check(prefix + "token_endpoint", spec.token_endpoint)
    if spec.issuer:
        await policy.check(prefix + "issuer", spec.issuer)
    if spec.resource:
        policy.check_syntax(prefix + "resource", spec.resource)
    if not spec.client_id and spec.grant_type is not GrantType.JWT_BEARER:
        raise InvalidArgument(prefix + "client_id", "is required: the OAuth client id")
    _check_text(prefix + "client_id", spec.client_id, MAX_CLIENT_ID, "client id")
    _check_text(prefix + "audience", spec.audience, MAX_URL, "audience")
    if len(spec.scopes) > MAX_SCOPES:
        raise InvalidArgument(prefix + "scopes", f"has more than {MAX_SCOPES} entries")
    for i, scope in enumerate(spec.scopes):
        if len(scope) > MAX_SCOPE or not SCOPE_TOKEN.fullmatch(scope):
            raise InvalidArgument(
                f"{prefix}scopes[{i}]",
                f"must be 1 to {MAX_SCOPE} printable ASCII characters without space, "
                "'\"' or '\\' (RFC 6749 scope-token); give one scope per entry",
            )
    if len(spec.extra_token_params) > MAX_PARAMS:
        raise InvalidArgument(prefix + "extra_token_params", f"has more than {MAX_PARAMS} entries")
    for key, value in spec.extra_token_params:
        name = f"{prefix}extra_token_params[{key[:40]!r}]"
        if len(key) > MAX_PARAM_KEY or not PARAM_KEY.fullmatch(key):
            raise InvalidArgument(name, "keys are 1 to 128 characters of A-Z, a-z, 0-9, _ . : -")
        if key in RESERVED_PARAMS:
            raise InvalidArgument(
                name, f"{key!r} is set by tokensvc; use the server field of that name instead"
            )
        _check_text(name, value, MAX_PARAM_VALUE, "value")
    _check_text(prefix + "key_id", spec.key_id, MAX_CLIENT_ID, "key id")
    if spec.signing_alg and spec.signing_alg not in SIGNING_ALGS:
        raise InvalidArgument(
            prefix + "signing_alg",
            f"must be one of {', '.join(SIGNING_ALGS)} (or empty: from the key)",
        )
    if spec.auth_method not in (AuthMethod.UNSPECIFIED, AuthMethod.PRIVATE_KEY_JWT) and (
        spec.key_id or spec.signing_alg or spec.assertion_audience
    ):
        raise InvalidArgument(
            prefix + "key_id",
            "key_id, signing_alg and assertion_audience apply to private_key_jwt only",
        )
    if spec.refresh_fraction and not 0.05 <= spec.refresh_fraction <= 0.95:
        raise InvalidArgument(
            prefix + "refresh_fraction",
            "must be 0 (the service default) or between 0.05 and 0.95 of the token's lifetime",
        )
    return spec


# The request field each kind of credential arrives in.
CREDENTIAL_FIELDS = {
    CredentialKind.CLIENT_SECRET: "client_secret",
    CredentialKind.PRIVATE_KEY: "private_key_pem",
    CredentialKind.CLIENT_CERTIFICATE: "client_certificate",
    CredentialKind.ASSERTION_FILE: "assertion_file",
}


def validate_credential(
    credential: Credential, spec: ServerSpec, assertions: AssertionDir | None = None
) -> Credential:
    """Checks the credential itself and that it fits the auth method and the
    grant; ``assertions`` is the operator's directory (None: none configured)."""
    kind, value = credential.kind, credential.value.reveal()
    name = CREDENTIAL_FIELDS[kind]
    if kind is CredentialKind.CLIENT_SECRET:
        if not value:
            raise InvalidArgument(name, "is empty: give the client secret, or omit it")
        if len(value) > MAX_SECRET:
            raise InvalidArgument(name, f"is longer than {MAX_SECRET} characters")
    elif kind is CredentialKind.PRIVATE_KEY:
        if len(value) > MAX_PRIVATE_KEY:
            raise InvalidArgument(name, f"is longer than {MAX_PRIVATE_KEY} characters")
        check_private_key(value, spec.signing_alg)
    elif kind is CredentialKind.CLIENT_CERTIFICATE:
        client_cert.parse(value)
        check_certificate_endpoint(kind, spec.token_endpoint)
    else:
        (assertions or AssertionDir(None)).check_name(value)
    if spec.grant_type is GrantType.JWT_BEARER:
        if kind is not CredentialKind.ASSERTION_FILE:
            raise InvalidArgument(
                name, "the jwt-bearer grant sends the JWT of an assertion_file: give one instead"
            )
        if spec.auth_method not in (AuthMethod.UNSPECIFIED, AuthMethod.NONE):
            raise InvalidArgument(
                "server.auth_method",
                "leave it unset (or none) with the jwt-bearer grant: the assertion is the grant",
            )
        return credential
    if spec.auth_method is AuthMethod.NONE:
        raise InvalidArgument(
            "server.auth_method", "none is only for grant_type GRANT_TYPE_JWT_BEARER"
        )
    fitting = METHODS_OF_KIND[kind]
    if spec.auth_method is not AuthMethod.UNSPECIFIED and spec.auth_method not in fitting:
        needs = [f for k, f in CREDENTIAL_FIELDS.items() if spec.auth_method in METHODS_OF_KIND[k]]
        raise InvalidArgument(
            name,
            f"auth_method is {spec.auth_method.value}, which needs {' or '.join(needs)} instead "
            f"(a {kind.value.replace('_', ' ')} serves {', '.join(m.value for m in fitting)})",
        )
    return credential


def check_certificate_endpoint(
    kind: CredentialKind, token_endpoint: str, field_name: str = "server.token_endpoint"
) -> None:
    """A client certificate is presented only in a TLS handshake (RFC 8705):
    never to a plain http token endpoint, given or discovered."""
    if kind is CredentialKind.CLIENT_CERTIFICATE and token_endpoint.lower().startswith("http://"):
        raise InvalidArgument(
            field_name,
            f"{token_endpoint[:200]} is plain http, but a client_certificate is presented "
            "only in a TLS handshake (RFC 8705): use an https token endpoint",
        )


def choose_auth_method(
    spec: ServerSpec, kind: CredentialKind | None, supported: tuple[str, ...] = ()
) -> AuthMethod:
    """The registered method, or the one that fits the credential and that the
    authorization server offers (the kind's preferred one if it says nothing)."""
    if spec.auth_method is not AuthMethod.UNSPECIFIED:
        return spec.auth_method
    if spec.grant_type is GrantType.JWT_BEARER:
        return AuthMethod.NONE
    fitting = METHODS_OF_KIND.get(kind or CredentialKind.CLIENT_SECRET, ())
    for method in fitting:
        if WIRE_NAMES.get(method, method.value) in supported:
            return method
    return fitting[0]
