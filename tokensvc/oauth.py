"""One token request: client credentials in, a :class:`Token` or a :class:`FetchError` out.

This is the only module that imports authlib's client side. authlib makes
the token request (RFC 6749's form body, the client authentication); the
request leaves through tokensvc.egress like every other outbound request, sent
straight to its transport (``egress.Poster``) rather than through authlib's
httpx client, whose layers cost a third of a token request and decide things
we decide here. What authlib would decide on its own is taken back:

- Nothing refreshes on its own: a token request is made explicitly, under the
  manager's policy (authlib's auto-refresh drops ``resource``/``audience``).
- Its ``client_secret_basic`` skips RFC 6749 section 2.3.1's form-urlencoding of
  id and secret, so each request carries our own encoder.
- Its response parsing treats a missing or zero ``expires_in`` as "forever" and
  chokes on ``"3599.5"``, so the response is read here.

Foreign exceptions are turned into ours at this one boundary, and every error
is raised outside the ``except`` block that caught the cause: an httpx2 error
carries the request (with its Authorization header) and a JSONDecodeError the
whole body, so neither may ride along as ``__context__`` into a log line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn
from urllib.parse import quote, quote_plus, urlencode, urlsplit

from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.client import DEFAULT_HEADERS
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from tokensvc import client_cert
from tokensvc.assertions import AssertionDir, AssertionUnusable
from tokensvc.client_cert import ClientCertificate
from tokensvc.egress import NETWORK_ERRORS, Answer, Egress, ResponseRefused, failure_words
from tokensvc.errors import (
    AuthorizationServerUnavailable,
    CredentialsRejected,
    CredentialUnavailable,
    FetchError,
    HostNotResolved,
    InvalidArgument,
    InvalidTokenResponse,
    OAuthErrorFields,
    TokenRequestRejected,
)
from tokensvc.keys import client_assertion
from tokensvc.registration import (
    MAX_SCOPE,
    MAX_SCOPES,
    METHODS_OF_KIND,
    AssertionAudience,
    AuthMethod,
    Credential,
    CredentialKind,
    GrantType,
    ServerSpec,
    choose_auth_method,
)
from tokensvc.token import Clock, Token, jwt_expiry, utcnow

# A server may claim any lifetime; beyond this we refresh anyway (and a huge
# value would overflow datetime arithmetic).
MAX_LIFETIME = timedelta(days=366)
MAX_ERROR = 64
MAX_ERROR_DESCRIPTION = 256
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CREDENTIAL_ERRORS = frozenset({"invalid_client", "unauthorized_client"})
# Error codes that say "later", whatever the status code they come with.
TRANSIENT_ERRORS = frozenset({"server_error", "temporarily_unavailable", "slow_down"})
# RFC 6749 appendix A.12: access-token = 1*VSCHAR. Anything else would end up
# in a broker's Authorization header (think CR LF).
ACCESS_TOKEN = re.compile(r"[\x20-\x7e]+")
TOKEN_TYPE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PERCENT = re.compile(r"%[0-9A-F]{2}")
# Endpoints that passed the URL policy, and each secret's forms to mask: kept
# for this many registrations (then forgotten all at once), not made per fetch.
MEMO_SIZE = 4096


class TokenFetcher:
    """Obtains access tokens with the client_credentials grant (RFC 6749 section 4.4).

    One shared connection pool serves every server: the client id and secret
    travel in a per-call auth object, never in shared state, so concurrent
    fetches for different servers cannot mix credentials. No cookie is kept,
    for the same reason.
    """

    def __init__(
        self,
        egress: Egress | None = None,
        *,
        default_lifetime: timedelta = timedelta(seconds=300),
        clock: Clock = utcnow,
        assertions: AssertionDir | None = None,
    ) -> None:
        self._assertions = assertions or AssertionDir(None)
        self._own_egress = egress is None
        self._egress = egress or Egress()
        self._timeout = self._egress.timeout
        self._default_lifetime = default_lifetime
        self._url_policy = self._egress.policy
        self._poster = self._egress.poster()
        self._clock = clock
        self._endpoints_checked: set[str] = set()
        self._masks: dict[tuple[str, str], tuple[str, ...]] = {}

    async def fetch(self, spec: ServerSpec, credential: Credential) -> Token:
        """One token request for ``spec`` (its token endpoint and auth method as
        resolved, see ``effective``); raises only :class:`FetchError` subclasses."""
        auth, secret, grant, certificate = self._client_auth(spec, credential)
        result = await self._send(spec, auth, grant, certificate)
        if isinstance(result, FetchError):
            raise result  # here, outside any except block: no __context__ to leak
        masks = self._masks_of(spec.client_id, secret)
        return _read_response(result, spec, masks, self._clock(), self._default_lifetime)

    def _masks_of(self, client_id: str, secret: str) -> tuple[str, ...]:
        """``secret_forms`` (some forty encodings), made once per credential."""
        if (masks := self._masks.get((client_id, secret))) is None:
            if len(self._masks) >= MEMO_SIZE:
                self._masks.clear()
            masks = self._masks[client_id, secret] = secret_forms(client_id, secret)
        return masks

    def _check_endpoint(self, url: str) -> None:
        """The URL policy's syntax check, once per endpoint (the policy is fixed)."""
        if url not in self._endpoints_checked:
            self._url_policy.check_syntax("server.token_endpoint", url)
            if len(self._endpoints_checked) >= MEMO_SIZE:
                self._endpoints_checked.clear()
            self._endpoints_checked.add(url)

    def _client_auth(
        self, spec: ServerSpec, credential: Credential
    ) -> tuple[ClientAuth, str, dict[str, str], ClientCertificate | None]:
        """The client authentication for the request, the secret it carries
        (to be masked in whatever comes back), the grant's parameters and the
        client certificate to present, if any."""
        method = choose_auth_method(spec, credential.kind)
        fits = METHODS_OF_KIND[credential.kind]
        if spec.grant_type is GrantType.JWT_BEARER:
            fits = (AuthMethod.NONE,) if credential.kind is CredentialKind.ASSERTION_FILE else ()
        if method not in fits:
            raise TokenRequestRejected(
                f"{method.value} cannot be used with a {credential.kind.value.replace('_', ' ')}: "
                "register the credential that fits the auth method"
            )
        grant = {"grant_type": spec.grant_type.value or "client_credentials"}
        if credential.kind is CredentialKind.CLIENT_CERTIFICATE:
            # RFC 8705 section 2: the TLS handshake authenticates the client;
            # the body names it. Nothing secret travels in the request.
            auth = ClientAuth(spec.client_id, None, auth_method=_body_auth())
            return auth, "", grant, _certificate(spec, credential)
        if credential.kind is CredentialKind.ASSERTION_FILE:
            secret = self._platform_assertion(credential.value.reveal())
            if spec.grant_type is GrantType.JWT_BEARER:
                grant["assertion"] = secret  # RFC 7523 section 2.1: the JWT is the grant
                auth = ClientAuth(spec.client_id, None, auth_method=_body_auth())
                return auth, secret, grant, None
            auth = ClientAuth(spec.client_id, None, auth_method=_assertion_auth(secret))
            return auth, secret, grant, None
        if method is AuthMethod.PRIVATE_KEY_JWT:
            audience = spec.issuer or spec.token_endpoint
            if spec.assertion_audience is AssertionAudience.TOKEN_ENDPOINT:
                audience = spec.token_endpoint
            # A bearer credential for five minutes: treated like a secret below.
            secret = client_assertion(
                credential.value.reveal(),
                spec.client_id,
                audience,
                self._clock(),
                spec.signing_alg,
                spec.key_id,
            )
            auth = ClientAuth(spec.client_id, None, auth_method=_assertion_auth(secret))
            return auth, secret, grant, None
        secret = credential.value.reveal()
        encoder: object = _encode_client_secret_basic
        if method is AuthMethod.CLIENT_SECRET_POST:
            encoder = "client_secret_post"  # authlib's own form-encodes correctly
        return ClientAuth(spec.client_id, secret, auth_method=encoder), secret, grant, None

    def _platform_assertion(self, name: str) -> str:
        """The platform's JWT from the assertion file, read now (it rotates)."""
        try:
            return self._assertions.read(name).value.reveal()
        except AssertionUnusable as exc:
            why = str(exc)
        raise CredentialUnavailable(f"assertion file {why}; no token request was sent")

    async def _send(
        self,
        spec: ServerSpec,
        auth: ClientAuth,
        grant: dict[str, str],
        certificate: ClientCertificate | None,
    ) -> Answer | FetchError:
        """The POST, with every failure returned (not raised) as one of our errors."""
        try:
            body = prepare_token_request(
                grant.pop("grant_type"),
                # Extra params go in the body as they are; authlib leaves out the
                # empty ones of its own (scope, resource, audience).
                urlencode(spec.extra_token_params),
                scope=" ".join(spec.scopes),
                resource=spec.effective_resource,
                audience=spec.audience,
                **grant,
            )
            url, headers, body = auth.prepare(
                "POST", spec.token_endpoint, dict(DEFAULT_HEADERS), body
            )
            async with asyncio.timeout(self._timeout):
                self._check_endpoint(url)
                return await self._poster.post(url, headers, body, certificate)
        except HostNotResolved:
            return _unreachable("its host name does not resolve")
        except InvalidArgument as exc:
            why = exc.message.removeprefix(f"{exc.field}: ")
            return TokenRequestRejected(f"token request not sent: server.token_endpoint {why}")
        except TimeoutError:
            return _unreachable(f"no answer within {self._timeout:g} s")
        except ResponseRefused as exc:
            return InvalidTokenResponse(exc.reason, OAuthErrorFields(status_code=exc.status))
        except NETWORK_ERRORS as exc:
            return _unreachable(failure_words(exc))
        except Exception as exc:  # authlib and h11 have more; none may escape raw.
            return _unreachable(f"unexpected {type(exc).__name__}")

    async def aclose(self) -> None:
        await self._poster.aclose()
        if self._own_egress:
            await self._egress.aclose()


def _certificate(spec: ServerSpec, credential: Credential) -> ClientCertificate:
    """The client certificate to present (RFC 8705): the TLS handshake
    authenticates the client, so the endpoint must be https."""
    if urlsplit(spec.token_endpoint).scheme != "https":
        raise TokenRequestRejected(
            "token request not sent: server.token_endpoint is not https, and a client "
            "certificate is presented only in a TLS handshake (RFC 8705)"
        )
    try:
        return client_cert.parse(credential.value.reveal())
    except InvalidArgument as exc:
        why = exc.message.removeprefix(f"{exc.field}: ")
    raise CredentialsRejected(
        f"the client certificate {why}; register a renewed certificate and key "
        "(no token request was sent)"
    )


def _body_auth(**params: str) -> Any:
    """Client authentication by form parameters in the body; empty ones are left out.
    RFC 7523 section 2.2's client assertion, or no authentication but the client_id
    (the jwt-bearer grant of SEP-1933 needs not even that: the assertion names the
    workload)."""

    def encode(client: Any, method: str, uri: str, headers: Any, body: Any) -> tuple[str, Any, Any]:
        fields = {"client_id": client.client_id, **params}
        extra = urlencode([(key, value) for key, value in fields.items() if value])
        if isinstance(body, bytes):
            body = body.decode()
        return uri, headers, f"{body}&{extra}" if body else extra

    return encode


def _assertion_auth(assertion: str) -> Any:
    return _body_auth(client_assertion_type=ASSERTION_TYPE, client_assertion=assertion)


def _encode_client_secret_basic(
    client: Any, method: str, uri: str, headers: Any, body: Any
) -> tuple[str, Any, Any]:
    """RFC 6749 section 2.3.1: form-urlencode id and secret, then base64."""
    pair = f"{quote_plus(client.client_id)}:{quote_plus(client.client_secret)}"
    headers["Authorization"] = "Basic " + base64.b64encode(pair.encode("ascii")).decode("ascii")
    return uri, headers, body


def _read_response(
    response: Answer,
    spec: ServerSpec,
    masks: tuple[str, ...],
    received: datetime,
    default_lifetime: timedelta,
) -> Token:
    """Turns what real authorization servers send into a Token or one of our errors."""
    status = response.status
    body = _json_object(response.body)
    error = (body or {}).get("error")
    fields = OAuthErrorFields(
        error=_clean(error, MAX_ERROR, masks),
        error_description=_clean(
            (body or {}).get("error_description"), MAX_ERROR_DESCRIPTION, masks
        ),
        status_code=status,
    )
    said = f"HTTP {status}" + (f", {fields.error}" if fields.error else "")
    said += f": {fields.error_description}" if fields.error_description else ""
    if status == 429 or status >= 500 or fields.error in TRANSIENT_ERRORS:
        retry_after = _retry_after(response.headers.get("retry-after"), received)
        hint = f"; retry after {retry_after:g} s" if retry_after is not None else ""
        raise AuthorizationServerUnavailable(
            f"token endpoint is unavailable ({said}){hint}", fields, retry_after
        )
    if status == 401 or fields.error in CREDENTIAL_ERRORS:
        raise CredentialsRejected(f"token endpoint refused the client credentials ({said})", fields)
    if 300 <= status < 400:
        raise TokenRequestRejected(
            f"token endpoint answered with a redirect ({said}): register its final URL", fields
        )
    if error or status >= 400:
        raise TokenRequestRejected(f"token endpoint refused the token request ({said})", fields)
    if body is None:
        raise InvalidTokenResponse(f"token endpoint answered {said} without a JSON object", fields)
    access_token = body.get("access_token")
    if not isinstance(access_token, str) or not ACCESS_TOKEN.fullmatch(access_token):
        raise InvalidTokenResponse(
            f"token endpoint answered {said} without a usable access_token", fields
        )
    token_type = body.get("token_type", "Bearer")
    if (
        not isinstance(token_type, str)
        or not TOKEN_TYPE.fullmatch(token_type)
        or _clean(token_type, len(token_type), masks) != token_type
    ):
        raise InvalidTokenResponse(f"token endpoint answered {said} with a bad token_type", fields)
    if token_type.lower() == "bearer":
        token_type = "Bearer"  # RFC 6749 section 5.1: case-insensitive
    scope = body.get("scope")
    if isinstance(scope, str):
        # Scopes are stored and shown: none may echo the secret, nor grow unbounded.
        scope = " ".join(s for s in scope.split()[:MAX_SCOPES] if len(s) <= MAX_SCOPE)
        scope = _clean(scope, MAX_SCOPES * (MAX_SCOPE + 1), masks)
    return Token(
        access_token=access_token,
        token_type=token_type,
        issued_at=received,
        expires_at=_expiry(body.get("expires_in"), access_token, received, default_lifetime),
        scopes=tuple(scope.split()) if isinstance(scope, str) and scope.strip() else spec.scopes,
    )


def _expiry(expires_in: object, access_token: str, now: datetime, default: timedelta) -> datetime:
    """``expires_in`` if usable, else a JWT's ``exp`` if in the future, else ``default``."""
    seconds = _positive_seconds(expires_in)
    if seconds is not None:  # clamped before timedelta(), which overflows near 1e14 s
        return now + timedelta(seconds=min(seconds, MAX_LIFETIME.total_seconds()))
    exp = jwt_expiry(access_token)
    if exp is not None and exp > now:
        return min(exp, now + MAX_LIFETIME)
    return now + default


def _positive_seconds(value: object) -> float | None:
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return None
        seconds = float(value)  # "3599.5" too; float() strips whitespace itself
    except (ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def _json_object(content: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None. Never raises: JSONDecodeError keeps the body."""
    try:
        value = json.loads(content, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(name)  # NaN and Infinity are not JSON


def _retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds from now: delay-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def secret_forms(client_id: str, secret: str) -> tuple[str, ...]:
    """Every form in which an authorization server might echo the secret: raw,
    percent-encoded (``+`` or ``%20`` for spaces, either case of hex), base64
    and base64url (padded or not) of the secret and of the Basic header's
    ``id:secret`` pair, raw and form-encoded. Longest first."""
    if not secret:
        return ()
    found = set()
    for text in (secret, f"{client_id}:{secret}", f"{quote_plus(client_id)}:{quote_plus(secret)}"):
        encoded = [text, quote_plus(text), quote(text, safe=""), quote(text)]
        for plain in (text.encode(), quote_plus(text).encode()):
            for b64 in (base64.b64encode(plain), base64.urlsafe_b64encode(plain)):
                encoded += [b64.decode(), b64.decode().rstrip("="), quote_plus(b64.decode())]
        for form in encoded:
            found |= {form, PERCENT.sub(lambda m: m.group().lower(), form)}
    return tuple(sorted(found - {""}, key=len, reverse=True))


def _clean(value: object, limit: int, masks: tuple[str, ...]) -> str:
    """Server text made safe for messages, storage and streams: no controls,
    no form of the secret, bounded."""
    if not isinstance(value, str):
        return ""
    text = CONTROL.sub("", value)
    for form in masks:
        text = text.replace(form, "***")
    return text[:limit]


def _unreachable(why: str) -> AuthorizationServerUnavailable:
    return AuthorizationServerUnavailable(f"could not reach the token endpoint: {why}")
