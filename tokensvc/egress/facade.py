"""Egress: what the rest of the service sends its requests through.

It builds the transports and clients of every outbound request (timeouts, the
response size cap, the user agent, no redirects, environment proxies or
cookies, the operator's ``outbound_ca_file``), and does discovery's GET hop by
hop. Failures are told in words that hold no foreign text.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpcore2
import httpx2

from tokensvc.client_cert import ClientCertificate
from tokensvc.egress.backend import PinnedBackend
from tokensvc.egress.limits import ResponseRefused, SizeLimited
from tokensvc.egress.policy import UrlPolicy
from tokensvc.egress.pools import CLIENT_CERTIFICATE, Pinned
from tokensvc.egress.stream import AsyncioBackend
from tokensvc.errors import InvalidArgument
from tokensvc.outbound_tls import OutboundTrust

# What callers of egress need of httpx2, so that they need not import it.
Request = httpx2.Request
Response = httpx2.Response
HTTPError = httpx2.HTTPError

MAX_REDIRECTS = 3
# Connections of one pool, open at once and kept idle: httpcore's default of
# 10 would queue the scheduler's concurrent token requests behind each other.
POOL_CONNECTIONS = 100


@dataclass(frozen=True, slots=True)
class Answer:
    """A GET's answer, read in full (within the size cap)."""

    status: int
    headers: dict[str, str]
    body: bytes


class Egress:
    """Builds the transport and clients every outbound request goes through.

    ``network`` is the backend that really connects (tests wrap it to record
    every address connected to); ``transport`` replaces the whole pinned
    transport (tests of response parsing only); ``ca_file`` adds CAs to the
    system's (``outbound_ca_file``). ValueError: ``ca_file`` is not usable.
    """

    def __init__(
        self,
        policy: UrlPolicy | None = None,
        *,
        timeout: float = 10.0,
        max_response_bytes: int = 65536,
        user_agent: str = "tokensvc",
        network: httpcore2.AsyncNetworkBackend | None = None,
        transport: httpx2.AsyncBaseTransport | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.policy = policy or UrlPolicy()
        self.trust = OutboundTrust(ca_file)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.user_agent = user_agent
        self._network = network or AsyncioBackend()
        self._transport = transport
        self._client: httpx2.AsyncClient | None = None

    def transport(self) -> httpx2.AsyncBaseTransport:
        """A new pinned, size-capped transport (its caller closes it). A
        request whose extensions carry CLIENT_CERTIFICATE presents it."""
        if self._transport is not None:
            return SizeLimited(self._transport, self.max_response_bytes)
        return SizeLimited(Pinned(self), self.max_response_bytes)

    def pool(self, scheme: str, context: ssl.SSLContext) -> httpx2.AsyncHTTPTransport:
        """One connection pool for ``scheme`` behind the pinned backend."""
        pool = httpx2.AsyncHTTPTransport(verify=context, trust_env=False)
        # httpx2 has no parameter for the network backend: its pool is
        # rebuilt with ours, the same settings otherwise.
        pool._pool = httpcore2.AsyncConnectionPool(
            ssl_context=context,
            network_backend=PinnedBackend(self.policy, scheme, self._network),
            max_connections=POOL_CONNECTIONS,
            max_keepalive_connections=POOL_CONNECTIONS,
        )
        return pool

    def client(self, headers: dict[str, str] | None = None, **options: Any) -> httpx2.AsyncClient:
        """An httpx2 client over a new egress transport: no redirects, no
        environment proxies or .netrc, no cookies kept, no compression."""
        return httpx2.AsyncClient(
            transport=self.transport(),
            timeout=httpx2.Timeout(self.timeout),
            follow_redirects=False,
            # Environment proxies and .netrc would send requests around the policy.
            trust_env=False,
            cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
            headers={**self._headers(), **(headers or {})},
            **options,
        )

    def poster(self) -> Poster:
        """A POST sender over a new egress transport (its caller closes it)."""
        return Poster(self.transport(), self._headers(), httpx2.Timeout(self.timeout).as_dict())

    def _headers(self) -> dict[str, str]:
        # identity: a compressed body would escape the size cap once decoded.
        return {"Accept-Encoding": "identity", "User-Agent": self.user_agent}

    async def get(self, url: str, field_name: str) -> Answer:
        """A GET for discovery: the URL policy on every hop, at most
        MAX_REDIRECTS redirects, the size cap, the timeout. Failures are
        InvalidArgument(field, why), never carrying a body."""
        if self._client is None:
            self._client = self.client()
        try:
            async with asyncio.timeout(self.timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    self.policy.check_syntax(field_name, url)
                    response = await self._client.get(url, headers={"Accept": "application/json"})
                    if response.status_code not in (301, 302, 303, 307, 308):
                        return Answer(
                            response.status_code,
                            {k.lower(): v for k, v in response.headers.items()},
                            response.content,
                        )
                    url = str(response.url.join(response.headers.get("Location", "")))
                failure = f"more than {MAX_REDIRECTS} redirects"
        except InvalidArgument as exc:
            if exc.field == field_name:
                raise
            failure = exc.message.removeprefix(f"{exc.field}: ")
        except TimeoutError:
            failure = f"no answer within {self.timeout:g} s"
        except ResponseRefused as exc:
            failure = exc.reason
        except Exception as exc:  # httpx2 and h11 errors: their kind, never their text
            failure = failure_words(exc)
        raise InvalidArgument(field_name, f"{url[:200]} could not be fetched: {failure}")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class Poster:
    """POSTs straight to an egress transport, each read in full: token requests.

    No client around it: its auth flow, cookies, redirects and URL merging cost
    a third of a token request's CPU, and a token request needs none of them.
    What egress's clients send is sent all the same: the timeouts, the user
    agent, ``Accept-Encoding: identity``; no redirect is followed."""

    def __init__(
        self, transport: httpx2.AsyncBaseTransport, headers: dict[str, str], timeouts: Any
    ) -> None:
        self._transport, self._headers, self._timeouts = transport, headers, timeouts

    async def post(
        self,
        url: str,
        headers: dict[str, str],
        body: str,
        certificate: ClientCertificate | None = None,
    ) -> Response:
        """``certificate``: presented in the TLS handshake (RFC 8705)."""
        extensions: dict[str, Any] = {"timeout": self._timeouts}
        if certificate is not None:
            extensions[CLIENT_CERTIFICATE] = certificate
        request = httpx2.Request(
            "POST",
            url,
            headers={**self._headers, **headers},
            content=body.encode(),
            extensions=extensions,
        )
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


def failure_words(exc: BaseException) -> str:
    """What failed, in words that hold no foreign text; a server certificate
    that the trust refuses is named as such, with the fix."""
    cause: BaseException | None = exc
    for _ in range(10):  # the chain is short; never loop on a cycle
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            why = str(cause.verify_message or "verification failed")[:80]
            return (
                f"its TLS certificate is not trusted ({why}): if a private CA signed it, "
                "give that CA in outbound_ca_file"
            )
        cause = cause.__cause__ or cause.__context__
    return words(type(exc).__name__)


def words(name: str) -> str:
    """``ConnectTimeout`` -> ``connect timeout``: the kind of failure, never its text."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()
