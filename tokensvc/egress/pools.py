"""The egress transport of every request but token requests (http11.py has
those): a connection pool per scheme, each behind the pinned backend
(backend.py); pools built with older trust (the CA file changed) are retired.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx2

from tokensvc.errors import InvalidArgument

if TYPE_CHECKING:
    from tokensvc.egress.facade import Egress


@dataclass(eq=False)
class _Pool:
    transport: httpx2.AsyncHTTPTransport
    in_flight: int = 0
    retired: bool = False


class Pinned(httpx2.AsyncBaseTransport):
    """Connection pools behind pinned backends, one per scheme (http and https
    differ in policy: plain http goes to loopback only). Pools made with
    older trust (the CA file changed) are retired: closed once no response
    still reads from them."""

    def __init__(self, egress: Egress) -> None:
        self._egress = egress
        self._pools: dict[str, _Pool] = {}
        self._retired: list[_Pool] = []
        self._generation = -1

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        scheme = request.url.scheme
        if scheme not in ("http", "https"):
            raise InvalidArgument("url", "must be an http(s) URL")
        pool = await self._lease(scheme)
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

    async def _lease(self, scheme: str) -> _Pool:
        # No await until the pool is counted in flight: concurrent requests
        # must not retire (and close) a pool between its choice and its use.
        trust = self._egress.trust
        trust.context()  # looks at the CA file
        closable: list[_Pool] = []
        if trust.generation != self._generation:
            self._generation = trust.generation
            while self._pools:
                closable += self._retire(next(iter(self._pools)))
        pool = self._pools.get(scheme)
        if pool is None:
            pool = self._pools[scheme] = _Pool(self._egress.pool(scheme, trust.context()))
        pool.in_flight += 1
        for idle in closable:
            await idle.transport.aclose()
        return pool

    def _retire(self, key: str) -> list[_Pool]:
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
