"""Caps on what a response may bring: at most ``limit`` bytes of body, and no
content encoding (a compressed body would escape the cap once decoded)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping

import httpx2


class ResponseRefused(Exception):
    """A response refused while it is read (too large, encoded)."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def refusal(headers: Mapping[str, str], limit: int) -> str:
    """Why a response with these headers (looked up in lower case) is refused
    before its body is read; empty if it is not."""
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return f"response is {encoding[:20]}-encoded although identity was asked for"
    length = headers.get("content-length", "")
    if re.fullmatch(r"[0-9]{1,20}", length) and int(length) > limit:
        return f"response larger than {limit} bytes"
    return ""


class SizeLimited(httpx2.AsyncBaseTransport):
    """Stops reading a response body once it passes ``limit`` bytes."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await self._inner.handle_async_request(request)
        status = response.status_code
        problem = refusal(response.headers, self._limit)
        if problem or not isinstance(response.stream, httpx2.AsyncByteStream):
            await response.aclose()
            raise ResponseRefused(problem or "response is not an async stream", status)
        return httpx2.Response(
            status,
            headers=response.headers,
            stream=_LimitedStream(response.stream, self._limit, status),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


class _LimitedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, limit: int, status: int) -> None:
        self._inner, self._limit, self._status = inner, limit, status

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._inner:
            received += len(chunk)
            if received > self._limit:
                raise ResponseRefused(f"response larger than {self._limit} bytes", self._status)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()
