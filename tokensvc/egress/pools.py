"""The egress transport: connection pools per scheme and client certificate.

Each pool sits behind the pinned backend (backend.py). A request whose
extensions carry CLIENT_CERTIFICATE presents it (RFC 8705) from a pool of its
own; at most MAX_POOLS pools are kept, the least recently used retired, and
pools built with older trust (the CA file changed) too.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx2

from tokensvc.client_cert import ClientCertificate
from tokensvc.errors import InvalidArgument

if TYPE_CHECKING:
    from tokensvc.egress.facade import Egress

# Connection pools per transport: one per scheme and client certificate in use.
MAX_POOLS = 64
# The request extension that carries the ClientCertificate to present (RFC 8705).
CLIENT_CERTIFICATE = "tokensvc.client_certificate"


@dataclass(eq=False)
class _Pool:
    transport: httpx2.AsyncHTTPTransport
    in_flight: int = 0
    retired: bool = False


class Pinned(httpx2.AsyncBaseTransport):
    """Connection pools behind pinned backends, one per scheme (http and https
    differ in policy: plain http goes to loopback only) and, for https, per
    client certificate presented (RFC 8705): a TLS context holds one
    certificate, and a connection made with one must not serve another's
    request. Pools made with older trust (the CA file changed) or evicted
    from the bounded cache are retired: closed once no response still reads
    from them."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress
        self._pools: OrderedDict[tuple[str, bytes], _Pool] = OrderedDict()
        self._retired: list[_Pool] = []
        self._generation = -1

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        scheme = request.url.scheme
        certificate = request.extensions.get(CLIENT_CERTIFICATE)
        if scheme not in ("http", "https"):
            raise InvalidArgument("url", "must be an http(s) URL")
        if certificate is not None and scheme != "https":
            raise InvalidArgument("url", "must be https to present a client certificate")
        pool = await self._lease(scheme, certificate)
        try:
            response = await pool.transport.handle_async_request(request)
        except BaseException:
            await self._release(pool)
            raise
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_Releasing(response.stream, functools.partial(self._release, pool)),
            extensions=response.extensions,
        )

    async def _lease(self, scheme: str, certificate: ClientCertificate | None) -> _Pool:
        # No await until the pool is counted in flight: concurrent requests
        # must not evict (and close) a pool between its choice and its use.
        trust = self._egress.trust
        trust.context()  # looks at the CA file
        closable: list[_Pool] = []
        if trust.generation != self._generation:
            self._generation = trust.generation
            while self._pools:
                closable += self._retire(next(iter(self._pools)))
        key = (scheme, _digest(certificate))
        pool = self._pools.get(key)
        if pool is None:
            context = (
                trust.client_context(certificate.chain_pem, certificate.key_pem)
                if certificate is not None
                else trust.context()
            )
            pool = self._pools[key] = _Pool(self._egress.pool(scheme, context))
        self._pools.move_to_end(key)
        pool.in_flight += 1
        while len(self._pools) > MAX_POOLS:  # the least recently used go
            closable += self._retire(next(iter(self._pools)))
        for idle in closable:
            await idle.transport.aclose()
        return pool

    def _retire(self, key: tuple[str, bytes]) -> list[_Pool]:
        """Takes a pool out of use; returns it if nothing reads from it (to close now)."""
        pool = self._pools.pop(key)
        pool.retired = True
        if pool.in_flight:
            self._retired.append(pool)
            return []
        return [pool]

    async def _release(self, pool: _Pool) -> None:
        pool.in_flight -= 1
        if pool.retired and not pool.in_flight:
            self._retired.remove(pool)
            await pool.transport.aclose()

    async def aclose(self) -> None:
        pools = [*self._pools.values(), *self._retired]
        self._pools.clear()
        self._retired.clear()
        for pool in pools:
            await pool.transport.aclose()


def _digest(certificate: ClientCertificate | None) -> bytes:
    if certificate is None:
        return b""
    return hashlib.sha256(f"{certificate.chain_pem}\0{certificate.key_pem}".encode()).digest()


class _Releasing(httpx2.AsyncByteStream):
    """A response stream that gives its pool back once, when closed."""

    def __init__(
        self, inner: httpx2.AsyncByteStream, release: Callable[[], Awaitable[None]]
    ) -> None:
        self._inner, self._release = inner, release
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._released:
                self._released = True
                await self._release()
