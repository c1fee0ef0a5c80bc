"""Egress: what the rest of the service sends its requests through.

It builds the token request sender (http11.py) and the transports and clients
of every other outbound request (timeouts, the response size cap, the user
agent, no redirects, environment proxies or cookies, the operator's
``outbound_ca_file``), and does discovery's GET hop by hop. Failures are told
in words that hold no foreign text.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpcore2
import httpx2

from tokensvc.egress.backend import PinnedBackend
from tokensvc.egress.http11 import MAX_CONNECTIONS, Answer, Poster
from tokensvc.egress.limits import ResponseRefused, SizeLimited
from tokensvc.egress.policy import UrlPolicy
from tokensvc.egress.pools import Pinned
from tokensvc.egress.stream import AsyncioBackend
from tokensvc.errors import InvalidArgument
from tokensvc.outbound_tls import OutboundTrust

# What callers of egress need of httpx2, so that they need not import it.
Request = httpx2.Request
Response = httpx2.Response
# What a request can fail with on its way: httpx2's errors (the clients) and
# httpcore2's (the token request sender, on the network backend's streams).
NETWORK_ERRORS = (
    httpx2.HTTPError,
    httpcore2.TimeoutException,
    httpcore2.NetworkError,
    httpcore2.ProtocolError,
)

MAX_REDIRECTS = 3


class Egress:
    """Builds the transport and clients every outbound request goes through.

    ``network`` is the backend that really connects (tests wrap it to record
    every address connected to, or replace it to answer with what no real
    server sends); ``ca_file`` adds CAs to the system's (``outbound_ca_file``).
    ValueError: ``ca_file`` is not usable.
    """

    def __init__(
        self,
        policy: UrlPolicy | None = None,
        *,
        timeout: float = 10.0,
        max_response_bytes: int = 65536,
        user_agent: str = "tokensvc",
        network: httpcore2.AsyncNetworkBackend | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.policy = policy or UrlPolicy()
        self.trust = OutboundTrust(ca_file)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.user_agent = user_agent
        self._network = network or AsyncioBackend()
        self._client: httpx2.AsyncClient | None = None

    def transport(self) -> httpx2.AsyncBaseTransport:
        """A new pinned, size-capped transport (its caller closes it)."""
        return SizeLimited(Pinned(self), self.max_response_bytes)

    def pool(self, scheme: str, context: ssl.SSLContext) -> httpx2.AsyncHTTPTransport:
        """One connection pool for ``scheme`` behind the pinned backend."""
        pool = httpx2.AsyncHTTPTransport(verify=context, trust_env=False)
        # httpx2 has no parameter for the network backend: its pool is
        # rebuilt with ours, the same settings otherwise.
        pool._pool = httpcore2.AsyncConnectionPool(
            ssl_context=context,
            network_backend=PinnedBackend(self.policy, scheme, self._network),
            # httpcore's default of 10 would queue concurrent requests behind each other.
            max_connections=MAX_CONNECTIONS,
            max_keepalive_connections=MAX_CONNECTIONS,
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
        """A sender of token requests, on connections of its own (its caller closes it)."""
        return Poster(
            self.policy,
            self.trust,
            self._network,
            self._headers(),
            timeout=self.timeout,
            max_response_bytes=self.max_response_bytes,
        )

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
