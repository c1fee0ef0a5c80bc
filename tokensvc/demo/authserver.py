"""A real OAuth 2.0 authorization server on a loopback socket, for tests and ``tokensvc demo``.

It is authlib's server side (``AuthorizationServer`` with the client_credentials
grant) behind a small Starlette adapter, served by uvicorn inside the caller's
event loop. It issues RS256-signed JWT access tokens, serves RFC 8414 metadata
and a JWKS, and takes ``Behaviour`` knobs that a test flips at run time to make
it slow, failing or oddly shaped the way real authorization servers are.

    async with AuthServer() as server:
        server.add_client("broker", "s3cret", scopes=("read",))
        ...  # POST to server.token_endpoint
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    JsonPayload,
    JsonRequest,
    OAuth2Payload,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.errors import (
    InvalidGrantError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
)
from authlib.oauth2.rfc6749.grants import BaseGrant, ClientCredentialsGrant, TokenEndpointMixin
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tokensvc.demo.federation import ASSERTION_TYPE, FEDERATED, JWT_BEARER, Platforms
from tokensvc.demo.loopback import LoopbackServer

AUTH_METHODS = ("client_secret_basic", "client_secret_post")
FORM = "application/x-www-form-urlencoded"


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
"""``Behaviour.expires_in``: send the lifetime, as a well-behaved server does."""


@dataclass
class Behaviour:
    """Knobs a test flips at run time; the defaults are a well-behaved server."""

    lifetime: float = 3600  # seconds; the JWT's exp and the expires_in sent
    expires_in: object = DEFAULT  # what goes on the wire: int, "3599.5", None = omit
    token_type: str = "Bearer"
    delay: float = 0.0  # seconds before answering (decided on arrival)
    gate: asyncio.Event | None = None  # if set, answer only once it is set (decided on arrival)
    fail_status: int | None = None  # answer this status instead of a token...
    fail_body: str | None = None  # ...with this body (default a JSON error)
    fail_content_type: str = "application/json"
    retry_after: str | None = None  # Retry-After header of a failure


@dataclass(frozen=True)
class _Client:
    """A registered client, shaped as authlib's ClientMixin expects."""

    client_id: str
    secret: str
    scopes: tuple[str, ...]
    # (issuer, subject) of the platform JWT that authenticates a federated client.
    federated: tuple[str, str] | None = None

    def get_client_id(self) -> str:
        return self.client_id

    def check_client_secret(self, client_secret: str) -> bool:
        # bytes: compare_digest refuses non-ASCII str, and secrets may be any text
        return bool(self.secret) and secrets.compare_digest(
            client_secret.encode(), self.secret.encode()
        )

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == FEDERATED if self.federated else method in AUTH_METHODS

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "client_credentials" or (
            self.federated is not None and grant_type == JWT_BEARER
        )

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(s for s in scope.split() if s in self.scopes)


@dataclass
class _Received:
    """A request as read by the async handler, for authlib's synchronous server."""

    method: str
    url: str
    headers: Headers
    body: bytes
    issuer: str
    form: list[tuple[str, str]] = field(default_factory=list)


class _FormPayload(OAuth2Payload):  # type: ignore[misc]  # authlib is untyped
    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in pairs:
            self._datalist[key].append(value)
        self._data = {key: values[0] for key, values in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class _FormRequest(OAuth2Request):  # type: ignore[misc]
    def __init__(self, received: _Received) -> None:
        super().__init__(received.method, received.url, headers=received.headers)
        self.payload = _FormPayload(received.form)
        self.issuer = received.issuer

    @property
    def form(self) -> dict[str, str]:
        return self.payload.data

    @property
    def args(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.uri).query))


class _BodyJson(JsonPayload):  # type: ignore[misc]
    def __init__(self, body: bytes) -> None:
        self._body = body

    @property
    def data(self) -> Any:
        return json.loads(self._body or b"{}")


def _check_scope_and_resource(request: _FormRequest) -> None:
    requested = set((request.payload.scope or "").split())
    if not requested <= set(request.client.scopes):
        raise InvalidScopeError(f"The client may ask for: {' '.join(request.client.scopes)}")
    for resource in request.payload.datalist.get("resource", []):
        parts = urlsplit(resource)
        if not parts.scheme or parts.fragment:  # RFC 8707 section 2: absolute, no fragment
            raise OAuth2Error("resource must be an absolute URI", error="invalid_target")


class _ClientCredentialsGrant(ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = [*AUTH_METHODS, FEDERATED]

    def validate_requested_scope(self) -> None:
        _check_scope_and_resource(self.request)

    def generate_token(self, scope: str | None = None, **_: Any) -> dict[str, Any]:
        # The server's token generator would not see the request, and aud needs it.
        return self.server.mint(self.request, scope)  # type: ignore[no-any-return]


class _JwtBearerGrant(BaseGrant, TokenEndpointMixin):  # type: ignore[misc]
    """RFC 7523 section 2.1 as SEP-1933 uses it: the platform's JWT is the
    grant, with no client authentication; it names the workload by iss and sub."""

    GRANT_TYPE = JWT_BEARER

    def validate_token_request(self) -> None:
        assertion = self.request.form.get("assertion")
        if not assertion:
            raise InvalidRequestError("Missing 'assertion' in request")
        client = self.server.vouched(assertion, self.request.form.get("client_id"))
        if client is None:
            raise InvalidGrantError("The assertion is not from a trusted platform for a client")
        self.request.client = client
        _check_scope_and_resource(self.request)

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        token = self.server.mint(self.request, self.request.payload.scope)
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class _OAuthServer(AuthorizationServer):  # type: ignore[misc]
    """authlib's authorization server, adapted to Starlette and to AuthServer's state."""

    def __init__(self, owner: AuthServer) -> None:
        super().__init__()
        self._owner = owner
        self.register_grant(_ClientCredentialsGrant)
        self.register_grant(_JwtBearerGrant)
        self.register_client_auth_method(FEDERATED, self._federated_client)

    def _federated_client(self, query_client: Any, request: _FormRequest) -> _Client | None:
        """Client authentication by a platform JWT as client_assertion."""
        form = request.form
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_id"):
            return None
        return self.vouched(form.get("client_assertion", ""), form["client_id"])

    def vouched(self, assertion: str, client_id: str | None) -> _Client | None:
        return self._owner._vouched(assertion, client_id)

    def query_client(self, client_id: str) -> _Client | None:
        return self._owner._clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: _FormRequest) -> None:
        self._owner.issued.append(token["access_token"])

    def mint(self, request: _FormRequest, scope: str | None) -> dict[str, Any]:
        return self._owner._mint(request, scope)

    def create_oauth2_request(self, request: _Received | _FormRequest) -> _FormRequest:
        return request if isinstance(request, _FormRequest) else _FormRequest(request)

    def create_json_request(self, request: _Received) -> JsonRequest:
        json_request = JsonRequest(request.method, request.url, request.headers)
        json_request.payload = _BodyJson(request.body)
        return json_request

    def handle_response(
        self, status: int, body: object, headers: Sequence[tuple[str, str]]
    ) -> Response:
        content = json.dumps(body) if isinstance(body, dict) else str(body)
        return Response(content, status_code=status, headers=dict(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        """No signal system here; nothing listens."""


class AuthServer(LoopbackServer):
    """An OAuth 2.0 authorization server on a real loopback socket.

    ``url``, ``issuer``, ``token_endpoint`` and ``jwks_uri`` are known once
    ``start()`` returns; by then the socket is bound and listening. ``app`` is
    the ASGI app, to mount elsewhere (the issuer is then taken from requests).
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, behaviour: Behaviour | None = None
    ) -> None:
        super().__init__(host, port)
        self.behaviour = behaviour or Behaviour()
        self.token_requests = 0
        self.issued: list[str] = []
        self.last_form: dict[str, str] = {}
        self.last_headers: dict[str, str] = {}
        self._clients: dict[str, _Client] = {}
        self._platforms = Platforms()
        self._key = RSAKey.generate_key(2048, {"alg": "RS256", "use": "sig"}, auto_kid=True)
        self._oauth = _OAuthServer(self)
        self._arrivals = asyncio.Condition()
        self.app = Starlette(
            routes=[
                Route("/token", self._token, methods=["POST"]),
                Route("/.well-known/oauth-authorization-server", self._metadata, methods=["GET"]),
                Route("/jwks", self._jwks, methods=["GET"]),
            ]
        )

    def add_client(
        self, client_id: str, secret: str, *, scopes: Sequence[str] = ("read", "write")
    ) -> None:
        self._clients[client_id] = _Client(client_id, secret, tuple(scopes))

    def trust_platform(self, issuer: str, jwks: KeySet, audience: str) -> None:
        """Accept JWTs from this platform issuer, signed by ``jwks`` and meant
        for ``audience``, from the federated clients it names."""
        self._platforms.trust(issuer, jwks, audience)

    def add_federated_client(
        self,
        client_id: str,
        issuer: str,
        subject: str,
        *,
        scopes: Sequence[str] = ("read", "write"),
    ) -> None:
        """A client with no secret: the platform's JWT for ``subject`` is its credential."""
        self._clients[client_id] = _Client(client_id, "", tuple(scopes), (issuer, subject))

    def _vouched(self, assertion: str, client_id: str | None) -> _Client | None:
        """The federated client a valid platform JWT stands for, or None."""
        workload = self._platforms.workload_of(assertion)
        if workload is None:
            return None
        return next(
            (
                c
                for c in self._clients.values()
                if c.federated == workload and client_id in (None, c.client_id)
            ),
            None,
        )

    async def wait_for_requests(self, count: int) -> None:
        """Returns once ``count`` requests have reached /token (a gate may still hold them)."""
        async with self._arrivals:
            await self._arrivals.wait_for(lambda: self.token_requests >= count)

    @property
    def url(self) -> str:
        if not self.base_url:
            raise RuntimeError("AuthServer is not started")
        return self.base_url

    @property
    def issuer(self) -> str:
        return self.url

    @property
    def token_endpoint(self) -> str:
        return self.url + "/token"

    @property
    def jwks_uri(self) -> str:
        return self.url + "/jwks"

    @property
    def public_jwk(self) -> dict[str, Any]:
        return dict(self._key.as_dict(private=False))

    def build_app(self) -> Starlette:
        return self.app

    def _issuer_of(self, request: Request) -> str:
        return self.base_url or str(request.base_url).rstrip("/")

    async def _token(self, request: Request) -> Response:
        body = await request.body()
        form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        self.last_form = {}
        for key, value in form:
            self.last_form.setdefault(key, value)  # first value wins, as in the payload
        self.last_headers = dict(request.headers.items())
        async with self._arrivals:
            self.token_requests += 1
            self._arrivals.notify_all()
        # The request is decided on arrival (client authenticated, token issued)
        # and only the answer waits: a held request behaves like one whose
        # response is slow on the wire, whatever changes meanwhile.
        behaviour = self.behaviour
        if behaviour.fail_status is not None:
            response = _failure(behaviour, behaviour.fail_status)
        else:
            response = self._answer(request, body, form)
        if behaviour.gate is not None:
            await behaviour.gate.wait()
        if behaviour.delay:
            await asyncio.sleep(behaviour.delay)
        return response

    def _answer(self, request: Request, body: bytes, form: list[tuple[str, str]]) -> Response:
        received = _Received(
            request.method, str(request.url), request.headers, body, self._issuer_of(request), form
        )
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != FORM:
            error = InvalidRequestError(f"Content-Type must be {FORM}")
            return self._oauth.handle_error_response(received, error)  # type: ignore[no-any-return]
        return self._oauth.create_token_response(received)  # type: ignore[no-any-return]

    def _mint(self, request: _FormRequest, scope: str | None) -> dict[str, Any]:
        client: _Client = request.client
        behaviour = self.behaviour
        granted = scope or " ".join(client.scopes)
        resources = request.payload.datalist.get("resource", [])
        audience: str | list[str] = (resources[0] if len(resources) == 1 else resources) or (
            request.payload.data.get("audience") or request.issuer
        )
        now = int(time.time())
        claims = {
            "iss": request.issuer,
            "sub": client.client_id,
            "client_id": client.client_id,
            "aud": audience,
            "scope": granted,
            "iat": now,
            "exp": now + math.ceil(behaviour.lifetime),
            "jti": secrets.token_urlsafe(16),
        }
        header = {"alg": "RS256", "kid": self._key.kid}
        token: dict[str, Any] = {
            "access_token": jwt.encode(header, claims, self._key),
            "token_type": behaviour.token_type,
        }
        if behaviour.expires_in is DEFAULT:
            lifetime = behaviour.lifetime
            token["expires_in"] = int(lifetime) if float(lifetime).is_integer() else lifetime
        elif behaviour.expires_in is not None:
            token["expires_in"] = behaviour.expires_in
        token["scope"] = granted
        return token

    async def _metadata(self, request: Request) -> JSONResponse:
        issuer = self._issuer_of(request)
        return JSONResponse(
            {  # RFC 8414 section 2; no authorization endpoint, so no response types
                "issuer": issuer,
                "token_endpoint": issuer + "/token",
                "jwks_uri": issuer + "/jwks",
                "grant_types_supported": ["client_credentials"]
                + ([JWT_BEARER] if self._platforms else []),
                # A federated assertion is a client assertion: private_key_jwt on the wire.
                "token_endpoint_auth_methods_supported": list(AUTH_METHODS)
                + (["private_key_jwt"] if self._platforms else []),
                "response_types_supported": [],
                "scopes_supported": sorted({s for c in self._clients.values() for s in c.scopes}),
            }
        )

    async def _jwks(self, request: Request) -> JSONResponse:
        return JSONResponse({"keys": [self.public_jwk]})


def _failure(behaviour: Behaviour, status: int) -> Response:
    body = behaviour.fail_body
    if body is None:
        error = {401: "invalid_client", 429: "temporarily_unavailable"}.get(
            status, "server_error" if status >= 500 else "invalid_request"
        )
        body = json.dumps({"error": error, "error_description": f"configured failure {status}"})
    headers = {"Cache-Control": "no-store"}
    if behaviour.retry_after is not None:
        headers["Retry-After"] = behaviour.retry_after
    return Response(
        body, status_code=status, media_type=behaviour.fail_content_type, headers=headers
    )
