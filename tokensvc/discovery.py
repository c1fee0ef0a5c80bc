"""Finding the token endpoint: from an issuer (RFC 8414, then OpenID
discovery), or from the MCP server itself (RFC 9728, then its authorization
server).

Every URL a document points to passes the same URL policy as a registered
one, responses are size-capped and redirects limited (by the HTTP getter, in
oauth.py), and a document is believed only if it names the issuer it was
fetched for (RFC 8414 section 3.3), so a metadata document cannot redirect
tokensvc's credentials elsewhere.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from tokensvc.egress import Answer, UrlPolicy
from tokensvc.errors import InvalidArgument
from tokensvc.registration import MTLS_METHODS, CredentialKind, ServerSpec, choose_auth_method
from tokensvc.token import Clock, utcnow

RESOURCE_METADATA = re.compile(r'resource_metadata="([^"]+)"')


@dataclass(frozen=True, slots=True)
class Discovery:
    issuer: str
    token_endpoint: str
    auth_methods_supported: tuple[str, ...] = ()
    resource_metadata_url: str = ""
    metadata_url: str = ""
    time: datetime | None = field(default=None, compare=False)
    # RFC 8705 section 5: where clients authenticating with mTLS send token requests.
    mtls_token_endpoint: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "issuer": self.issuer,
                "token_endpoint": self.token_endpoint,
                "auth_methods_supported": list(self.auth_methods_supported),
                "resource_metadata_url": self.resource_metadata_url,
                "metadata_url": self.metadata_url,
                "time": self.time.isoformat() if self.time else None,
                "mtls_token_endpoint": self.mtls_token_endpoint,
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> Discovery | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(
            issuer=data["issuer"],
            token_endpoint=data["token_endpoint"],
            auth_methods_supported=tuple(data.get("auth_methods_supported") or ()),
            resource_metadata_url=data.get("resource_metadata_url", ""),
            metadata_url=data.get("metadata_url", ""),
            time=datetime.fromisoformat(data["time"]) if data.get("time") else None,
            mtls_token_endpoint=data.get("mtls_token_endpoint", ""),
        )


class Getter(Protocol):
    """A GET under the URL policy, size cap and redirect limit; raises
    InvalidArgument(field, why) when the URL may not be fetched or fails."""

    async def __call__(self, url: str, field: str, /) -> Answer: ...


def complete(spec: ServerSpec, kind: CredentialKind | None, found: Discovery | None) -> ServerSpec:
    """What a token is fetched with: the registration, completed by what
    discovery found (token endpoint, issuer) and the auth method chosen. A
    client authenticating with mTLS uses the discovered mTLS alias, if any."""
    method = choose_auth_method(spec, kind, found.auth_methods_supported if found else ())
    endpoint = spec.token_endpoint
    if not endpoint and found is not None:
        endpoint = found.token_endpoint
        if method in MTLS_METHODS and found.mtls_token_endpoint:
            endpoint = found.mtls_token_endpoint
    return replace(
        spec,
        token_endpoint=endpoint,
        issuer=spec.issuer or (found.issuer if found else ""),
        auth_method=method,
    )


def needs_discovery(spec: ServerSpec) -> bool:
    return not spec.token_endpoint


async def discover(
    spec: ServerSpec, get: Getter, policy: UrlPolicy, clock: Clock = utcnow
) -> Discovery:
    """Where and how ``spec`` gets tokens; InvalidArgument names the field
    whose discovery failed and why."""
    resource_metadata_url = ""
    issuer = spec.issuer
    field_name = "server.issuer"
    if not issuer:
        field_name = "server.mcp_url"
        resource_metadata_url, issuer = await _from_resource(spec.mcp_url, get, policy)
    metadata_url, document = await _authorization_server_metadata(issuer, get, field_name)
    token_endpoint = document.get("token_endpoint")
    if not isinstance(token_endpoint, str) or not token_endpoint:
        raise InvalidArgument(field_name, f"{metadata_url} names no token_endpoint")
    try:
        await policy.check("token_endpoint", token_endpoint)
    except InvalidArgument as exc:
        raise InvalidArgument(
            field_name, f"the discovered token endpoint is refused: {exc.message}"
        ) from None
    mtls_token_endpoint = ""
    aliases = document.get("mtls_endpoint_aliases")
    if isinstance(aliases, dict) and isinstance(aliases.get("token_endpoint"), str):
        mtls_token_endpoint = aliases["token_endpoint"]
        await _allowed(policy, mtls_token_endpoint, field_name)
    methods = document.get("token_endpoint_auth_methods_supported") or ()
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        methods = ()
    return Discovery(
        issuer=issuer,
        token_endpoint=token_endpoint,
        auth_methods_supported=tuple(m[:64] for m in methods[:32]),
        resource_metadata_url=resource_metadata_url,
        metadata_url=metadata_url,
        time=clock(),
        mtls_token_endpoint=mtls_token_endpoint,
    )


async def _from_resource(mcp_url: str, get: Getter, policy: UrlPolicy) -> tuple[str, str]:
    """RFC 9728: the resource_metadata of the 401's WWW-Authenticate, else the
    well-known document with the resource's path, else at the root."""
    field_name = "server.mcp_url"
    candidates = []
    answer = await get(mcp_url, field_name)
    challenge = answer.headers.get("www-authenticate", "")
    if match := RESOURCE_METADATA.search(challenge):
        candidates.append(match.group(1))
    parts = urlsplit(mcp_url)
    path = parts.path.rstrip("/")
    if path:
        candidates.append(_at(parts, "/.well-known/oauth-protected-resource" + path))
    candidates.append(_at(parts, "/.well-known/oauth-protected-resource"))
    tried = []
    for url in dict.fromkeys(candidates):
        await _allowed(policy, url, field_name)
        tried.append(url)
        document = _document(await get(url, field_name))
        if document is None:
            continue
        servers = document.get("authorization_servers")
        if isinstance(servers, list) and servers and isinstance(servers[0], str):
            await _allowed(policy, servers[0], field_name)
            return url, servers[0]
        raise InvalidArgument(field_name, f"{url} names no authorization_servers")
    raise InvalidArgument(
        field_name,
        f"found no RFC 9728 protected resource metadata (tried {', '.join(tried)}): "
        "give server.issuer or server.token_endpoint",
    )


async def _authorization_server_metadata(
    issuer: str, get: Getter, field_name: str
) -> tuple[str, dict[str, Any]]:
    """RFC 8414 (path insertion), then OpenID discovery (path insertion, then
    path append); the first document that names this issuer wins."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    candidates = [
        _at(parts, "/.well-known/oauth-authorization-server" + path),
        _at(parts, "/.well-known/openid-configuration" + path),
        _at(parts, path + "/.well-known/openid-configuration"),
    ]
    problems = []
    for url in dict.fromkeys(candidates):
        document = _document(await get(url, field_name))
        if document is None:
            problems.append(f"{url}: no JSON metadata")
            continue
        if document.get("issuer") != issuer:
            problems.append(f"{url}: names issuer {str(document.get('issuer'))[:100]!r}")
            continue
        return url, document
    raise InvalidArgument(
        field_name, f"no authorization server metadata for {issuer} ({'; '.join(problems)})"
    )


def _at(parts: Any, path: str) -> str:
    return str(urlunsplit((parts.scheme, parts.netloc, path, "", "")))


async def _allowed(policy: UrlPolicy, url: str, field_name: str) -> None:
    try:
        await policy.check(field_name, url)
    except InvalidArgument as exc:
        raise InvalidArgument(
            field_name, f"discovery points to a refused URL: {exc.message}"
        ) from None


def _document(answer: Answer) -> dict[str, Any] | None:
    if answer.status != 200:
        return None
    try:
        value = json.loads(answer.body)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None
