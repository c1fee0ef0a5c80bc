"""The errors of tokensvc, and the one table that maps them to gRPC.

::

    TokenSvcError
    ├── ServerNotFound              NOT_FOUND            SERVER_NOT_FOUND
    ├── InvalidArgument(field)      INVALID_ARGUMENT     INVALID_ARGUMENT
    │   └── HostNotResolved         (at fetch time: AuthorizationServerUnavailable)
    ├── RevisionMismatch            ABORTED              REVISION_MISMATCH
    ├── RegistrationChanged         ABORTED              REGISTRATION_CHANGED
    ├── StoreUnavailable            UNAVAILABLE          STORE_UNAVAILABLE
    ├── Unauthenticated             UNAUTHENTICATED      UNAUTHENTICATED
    ├── PermissionDenied            PERMISSION_DENIED    PERMISSION_DENIED
    ├── LastAdmin                   FAILED_PRECONDITION  LAST_ADMIN
    ├── ConfigurationError          (startup only: the process refuses to start)
    ├── DecryptionError             (a ciphertext fails to open: wrong key, moved row, tampering)
    └── FetchError                  a token request failed
        ├── CredentialsRejected     FAILED_PRECONDITION  CREDENTIALS_REJECTED
        ├── TokenRequestRejected    FAILED_PRECONDITION  TOKEN_REQUEST_REJECTED
        └── TransientFetchError     retry with backoff
            ├── AuthorizationServerUnavailable
            │                       UNAVAILABLE          AUTHORIZATION_SERVER_UNAVAILABLE
            ├── InvalidTokenResponse
            │                       UNAVAILABLE          INVALID_TOKEN_RESPONSE
            └── CredentialUnavailable
                                    UNAVAILABLE          CREDENTIAL_UNAVAILABLE

Foreign exceptions (httpx2, authlib, SQLAlchemy) are turned into these at the
one module that imports that library. Messages never contain a secret, a
private key, an access token or a raw response body: they are shown to
callers and written to logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

DOMAIN = "tokensvc"


class TokenSvcError(Exception):
    """Base of every error tokensvc raises on purpose."""

    reason = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def metadata(self) -> dict[str, str]:
        """Extra ErrorInfo metadata (never a secret)."""
        return {}


class ServerNotFound(TokenSvcError):
    reason = "SERVER_NOT_FOUND"

    def __init__(self, server_id: str) -> None:
        super().__init__(f"no server with id {server_id!r} is registered")
        self.server_id = server_id

    def metadata(self) -> dict[str, str]:
        return {"server_id": self.server_id}


class InvalidArgument(TokenSvcError):
    """Bad input. ``field`` is the request field's path, e.g. ``server.token_endpoint``."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

    def metadata(self) -> dict[str, str]:
        return {"field": self.field}


class HostNotResolved(InvalidArgument):
    """A URL's host does not resolve: refused at registration, transient at fetch."""


class RevisionMismatch(TokenSvcError):
    reason = "REVISION_MISMATCH"

    def __init__(self, server_id: str, expected: int, actual: int) -> None:
        what = "does not exist" if actual == 0 else f"is at revision {actual}"
        wanted = "not to exist" if expected == -1 else f"to be at revision {expected}"
        super().__init__(f"server {server_id!r} {what}, expected {wanted}: re-read it and retry")
        self.actual = actual

    def metadata(self) -> dict[str, str]:
        return {"revision": str(self.actual)}


class RegistrationChanged(TokenSvcError):
    """The server was re-registered again and again while a token was fetched."""

    reason = "REGISTRATION_CHANGED"

    def __init__(self, server_id: str) -> None:
        super().__init__(f"server {server_id!r} kept changing while its token was fetched: retry")


class StoreUnavailable(TokenSvcError):
    reason = "STORE_UNAVAILABLE"


class Unauthenticated(TokenSvcError):
    """No valid identity on the call. Says nothing of which servers exist."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(TokenSvcError):
    reason = "PERMISSION_DENIED"


class LastAdmin(TokenSvcError):
    """Revoking this caller would leave no admin: tokensvc never reopens."""

    reason = "LAST_ADMIN"


class ConfigurationError(TokenSvcError):
    """A setting, key or database state that stops the service from starting."""

    reason = "CONFIGURATION"


class DecryptionError(TokenSvcError):
    reason = "DECRYPTION_FAILED"


@dataclass(frozen=True, slots=True)
class OAuthErrorFields:
    """RFC 6749 section 5.2 fields of an authorization server's refusal."""

    error: str = ""
    error_description: str = ""
    status_code: int = 0


class FetchError(TokenSvcError):
    """A token request failed. ``oauth`` holds what the authorization server said."""

    reason = "FETCH_FAILED"

    def __init__(self, message: str, oauth: OAuthErrorFields | None = None) -> None:
        super().__init__(message)
        self.oauth = oauth or OAuthErrorFields()

    def metadata(self) -> dict[str, str]:
        meta = {}
        if self.oauth.error:
            meta["error"] = self.oauth.error
        if self.oauth.error_description:
            meta["error_description"] = self.oauth.error_description
        if self.oauth.status_code:
            meta["http_status"] = str(self.oauth.status_code)
        return meta


class CredentialsRejected(FetchError):
    """``invalid_client`` or ``unauthorized_client``: retrying will not help."""

    reason = "CREDENTIALS_REJECTED"


class TokenRequestRejected(FetchError):
    """Any other refusal: ``invalid_scope``, ``invalid_target``, a 4xx."""

    reason = "TOKEN_REQUEST_REJECTED"


class TransientFetchError(FetchError):
    """Worth retrying later. ``retry_after`` (seconds) is the server's hint, if any."""

    def __init__(
        self,
        message: str,
        oauth: OAuthErrorFields | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, oauth)
        self.retry_after = retry_after


class AuthorizationServerUnavailable(TransientFetchError):
    reason = "AUTHORIZATION_SERVER_UNAVAILABLE"


class InvalidTokenResponse(TransientFetchError):
    reason = "INVALID_TOKEN_RESPONSE"


class CredentialUnavailable(TransientFetchError):
    """tokensvc's own credential cannot be used now: the platform's assertion
    file is missing, not a JWT or expired. No request was sent; the platform
    is expected to renew it."""

    reason = "CREDENTIAL_UNAVAILABLE"


# The one table from error to gRPC status code. Most specific class first.
GRPC_STATUS: tuple[tuple[type[TokenSvcError], grpc.StatusCode], ...] = (
    (ServerNotFound, grpc.StatusCode.NOT_FOUND),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (RevisionMismatch, grpc.StatusCode.ABORTED),
    (RegistrationChanged, grpc.StatusCode.ABORTED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (LastAdmin, grpc.StatusCode.FAILED_PRECONDITION),
    (CredentialsRejected, grpc.StatusCode.FAILED_PRECONDITION),
    (TokenRequestRejected, grpc.StatusCode.FAILED_PRECONDITION),
    (TransientFetchError, grpc.StatusCode.UNAVAILABLE),
)


def grpc_status_of(error: TokenSvcError) -> grpc.StatusCode:
    for cls, code in GRPC_STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


FETCH_ERRORS: tuple[type[FetchError], ...] = (
    CredentialsRejected,
    TokenRequestRejected,
    AuthorizationServerUnavailable,
    InvalidTokenResponse,
    CredentialUnavailable,
)


def error_of(reason: str, error: str, error_description: str) -> FetchError:
    """A recorded failure as the error it was (for watchers on other replicas)."""
    kinds = {cls.reason: cls for cls in FETCH_ERRORS}
    cls = kinds.get(reason, AuthorizationServerUnavailable)
    return cls(error_description or reason, OAuthErrorFields(error, error_description))
