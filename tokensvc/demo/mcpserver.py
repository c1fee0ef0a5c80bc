"""An OAuth-protected MCP server on a loopback socket, for tests and ``tokensvc demo``.

A demo and test server, not a production resource server. It is the official
MCP SDK's ``MCPServer`` with a few tools, served over streamable HTTP by
uvicorn inside the caller's event loop, acting as an OAuth 2.0 resource
server: every request needs a bearer JWT from ``issuer``, signed RS256 by a
key of its JWKS, whose ``aud`` is this server's MCP URL (RFC 8707) and whose
``exp`` is in the future by the injected clock. A refused request is answered
401 with ``WWW-Authenticate: Bearer ..., resource_metadata="..."`` pointing at
the RFC 9728 document, which names ``issuer`` as the authorization server.

    async with ProtectedMCPServer(issuer=auth.issuer, jwks_uri=auth.jwks_uri) as mcp:
        ...  # an MCP client with a token for resource=mcp.url
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx2
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from mcp.server.auth.handlers.metadata import ProtectedResourceMetadataHandler
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import ProtectedResourceMetadata
from pydantic import AnyHttpUrl
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokensvc.demo.loopback import LoopbackServer

LEEWAY = 1  # seconds of clock skew allowed on exp/iat; issuer and server share one machine
JWKS_REFETCH_INTERVAL = 5.0  # seconds; an unknown kid refetches the JWKS at most this often


class JWTVerifier:
    """The SDK's ``TokenVerifier``: a local check of an RS256 JWT access token."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_uri: str | None = None,
        jwk: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (jwks_uri is None) == (jwk is None):
            raise ValueError("give exactly one of jwks_uri and jwk")
        self._jwks_uri = jwks_uri
        self._keys = KeySet.import_key_set({"keys": [jwk]}) if jwk is not None else None
        self._fetched_at = -JWKS_REFETCH_INTERVAL
        self._lock = asyncio.Lock()
        self._claims = JWTClaimsRegistry(
            now=lambda: int(clock()),
            leeway=LEEWAY,
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
        )
        self.audience = audience

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            keys = self._keys if self._keys is not None else await self._fetch_keys(None)
            try:
                decoded = jwt.decode(token, keys, algorithms=["RS256"])
            except InvalidKeyIdError:
                if self._jwks_uri is None:
                    raise
                # The authorization server may have rotated its key: look again, once.
                decoded = jwt.decode(token, await self._fetch_keys(keys), algorithms=["RS256"])
            claims = decoded.claims
            self._claims.validate(claims)
        except (JoseError, ValueError, KeyError, httpx2.HTTPError):
            return None  # the SDK answers 401, whatever the reason
        client_id = claims.get("client_id") or claims.get("sub")
        if not isinstance(client_id, str) or not isinstance(claims.get("scope", ""), str):
            return None
        return AccessToken(
            token=token,
            client_id=client_id,
            scopes=claims.get("scope", "").split(),
            expires_at=int(claims["exp"]),
            resource=self.audience,
            subject=claims.get("sub"),
            claims={k: claims[k] for k in ("iss", "jti") if k in claims},
        )

    async def _fetch_keys(self, stale: KeySet | None) -> KeySet:
        """The JWKS, fetched on first use and again when ``stale`` is the cached one."""
        assert self._jwks_uri is not None
        async with self._lock:  # one fetch for concurrent requests
            due = time.monotonic() - self._fetched_at >= JWKS_REFETCH_INTERVAL
            if self._keys is None or (self._keys is stale and due):
                self._fetched_at = time.monotonic()
                async with httpx2.AsyncClient(timeout=5.0) as client:
                    response = await client.get(self._jwks_uri)
                    response.raise_for_status()
                self._keys = KeySet.import_key_set(response.json())
            return self._keys


class ProtectedMCPServer(LoopbackServer):
    """An OAuth-protected MCP server on a real loopback socket.

    ``url`` (the MCP endpoint, also the resource and the ``aud`` expected) is
    known once ``start()`` returns. ``accepted`` counts requests whose bearer
    token verified, ``rejected`` requests answered 401, ``tool_calls`` tool
    invocations. Give ``jwks_uri`` (fetched once, again on an unknown ``kid``)
    or a public ``jwk``.
    """

    def __init__(
        self,
        *,
        issuer: str,
        jwks_uri: str | None = None,
        jwk: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (jwks_uri is None) == (jwk is None):
            raise ValueError("give exactly one of jwks_uri and jwk")
        super().__init__(host, port)
        self.issuer = issuer
        self._jwks_uri, self._jwk, self._clock = jwks_uri, jwk, clock
        self.accepted = self.rejected = self.tool_calls = 0

    @property
    def url(self) -> str:
        return self.base_url + "/mcp" if self.base_url else ""

    @property
    def resource_metadata_url(self) -> str:
        """The RFC 9728 document, at the path the SDK derives from ``url``."""
        return str(build_resource_metadata_url(AnyHttpUrl(self.url)))

    lifespan = "on"  # the SDK's session manager runs in the app's lifespan

    def build_app(self) -> ASGIApp:
        return _Counting(self._app(), self)

    def _app(self) -> ASGIApp:
        verifier = JWTVerifier(
            issuer=self.issuer,
            audience=self.url,
            jwks_uri=self._jwks_uri,
            jwk=self._jwk,
            clock=self._clock,
        )
        server: MCPServer[Any] = MCPServer(
            "tokensvc-demo",
            instructions="A demo MCP server protected by OAuth 2.0 bearer tokens.",
            token_verifier=verifier,
            # From strings, so that a path-less issuer keeps its exact spelling:
            # AnyHttpUrl(issuer) would add a "/" (RFC 8414 compares issuers exactly).
            auth=AuthSettings.model_validate(
                {
                    "issuer_url": self.issuer,
                    "resource_server_url": self.url,
                    # The verifier checks aud; the SDK checks AccessToken.resource again.
                    "validate_token_resource": True,
                }
            ),
            log_level="WARNING",
        )

        @server.tool()
        def echo(text: str) -> str:
            """Returns the text it is given."""
            self.tool_calls += 1
            return text

        @server.tool()
        def add(a: float, b: float) -> float:
            """Adds two numbers."""
            self.tool_calls += 1
            return a + b

        @server.tool()
        def whoami() -> dict[str, Any]:
            """The client, scopes and token id (jti) of the bearer token of this call."""
            self.tool_calls += 1
            token = get_access_token()
            assert token is not None  # every request passed the bearer check
            claims = token.claims or {}
            return {"client_id": token.client_id, "scopes": token.scopes, "jti": claims.get("jti")}

        # The SDK serves RFC 9728 at the path-suffixed URL only; MCP clients also try the root.
        metadata = ProtectedResourceMetadata.model_validate(
            {"resource": self.url, "authorization_servers": [self.issuer]}
        )
        handler = ProtectedResourceMetadataHandler(metadata)
        server.custom_route("/.well-known/oauth-protected-resource", methods=["GET"])(
            handler.handle
        )
        return server.streamable_http_app(host=self._host)


class _Counting:
    """ASGI middleware counting authenticated requests and 401 answers."""

    def __init__(self, app: ASGIApp, owner: ProtectedMCPServer) -> None:
        self.app, self.owner = app, owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 401:
                    self.owner.rejected += 1
                elif isinstance(scope.get("user"), AuthenticatedUser):  # set in place by the SDK
                    self.owner.accepted += 1
            await send(message)

        await self.app(scope, receive, counting_send)
