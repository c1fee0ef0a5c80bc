"""The network backend under every egress connection, pinned to checked addresses.

It resolves a host once per connection, checks every address it resolved to
against the policy, and connects to a checked address. The URL keeps the
name, so TLS (SNI and the certificate's hostname check) is still about the
name. A resolver that answers differently the second time (DNS rebinding)
therefore gains nothing: there is no second time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpcore2

from tokensvc.egress.policy import UrlPolicy


class PinnedBackend(httpcore2.AsyncNetworkBackend):
    """Resolves once per connection, checks, and connects to a checked address."""

    def __init__(
        self, policy: UrlPolicy, scheme: str, inner: httpcore2.AsyncNetworkBackend
    ) -> None:
        self._policy, self._scheme, self._inner = policy, scheme, inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2 signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        addresses = await self._policy.addresses("url", host, port, self._scheme)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2 signature)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise httpcore2.ConnectError("unix sockets are not used for egress")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
