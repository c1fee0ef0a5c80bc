"""httpcore2's network backend on asyncio's own transports, without anyio.

A token request is small and the pool's connections are many, so what costs
is per call, not per byte. httpcore2 asks every idle connection, on every
request it assigns and every response it closes, whether its socket is
readable (a closed keep-alive). Through anyio that is a ``getpeername`` and a
``poll`` per idle connection, each time: with the dozens of connections a
refresh schedule keeps open, it was a sixth of a token request's CPU. Here
the event loop already reads every socket, so the answer is in memory: data
or an end of stream has arrived, or not. Reads, writes and TLS are asyncio's
transports; a timeout is an ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore2

# Past this much unread data the transport stops reading (flow control);
# egress caps a response far below it anyway.
HIGH_WATER = 256 * 1024


class _Protocol(asyncio.Protocol):
    """What arrived on one connection, and whether it may be written to."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False
        self.error: Exception | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.error = exc
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def _until(
    name: str, protocol: _Protocol, seconds: float | None, timed_out: Exception
) -> None:
    """Waits for the protocol to settle its future ``name`` (new data, or
    room to write), at most ``seconds``; then raises ``timed_out``."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    setattr(protocol, name, future)
    try:
        async with asyncio.timeout(seconds):
            await future
    except TimeoutError:
        raise timed_out from None
    finally:
        setattr(protocol, name, None)


class AsyncioStream(httpcore2.AsyncNetworkStream):
    def __init__(self, protocol: _Protocol) -> None:
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        protocol = self._protocol
        if not protocol.buffer and not protocol.ended:
            await _until("waiter", protocol, timeout, httpcore2.ReadTimeout("no data in time"))
        if protocol.buffer:
            data = bytes(protocol.buffer[:max_bytes])
            del protocol.buffer[:max_bytes]
            if protocol.reading_paused and len(protocol.buffer) <= HIGH_WATER:
                protocol.reading_paused = False
                if protocol.transport is not None:
                    protocol.transport.resume_reading()
            return data
        if protocol.error is not None:
            raise httpcore2.ReadError(str(protocol.error)) from protocol.error
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        protocol = self._protocol
        if not buffer:
            return
        transport = protocol.transport
        if transport is None or transport.is_closing() or protocol.ended:
            raise httpcore2.WriteError("the connection is closed")
        transport.write(buffer)
        if protocol.writing_paused:
            timed_out = httpcore2.WriteTimeout("could not write in time")
            await _until("drained", protocol, timeout, timed_out)
            if protocol.error is not None:
                raise httpcore2.WriteError(str(protocol.error)) from protocol.error

    async def aclose(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore2.AsyncNetworkStream:
        protocol = self._protocol
        assert protocol.transport is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport = await loop.start_tls(
                    protocol.transport, protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            protocol.transport.close()
            raise httpcore2.ConnectTimeout("no TLS handshake within the timeout") from None
        except (OSError, ssl.SSLError) as exc:  # the cause is kept: failure_words reads it
            protocol.transport.close()
            raise httpcore2.ConnectError(str(exc)) from exc
        assert isinstance(transport, asyncio.Transport)
        protocol.transport = transport
        return self

    def get_extra_info(self, info: str) -> Any:
        transport = self._protocol.transport
        if info == "is_readable":  # an idle connection with news: the server closed it
            return bool(self._protocol.buffer) or self._protocol.ended
        if transport is None:
            return None
        name = {"client_addr": "sockname", "server_addr": "peername"}.get(info, info)
        if name in ("ssl_object", "sockname", "peername", "socket"):
            return transport.get_extra_info(name)
        return None


class AsyncioBackend(httpcore2.AsyncNetworkBackend):
    """Connects to an address: egress's PinnedBackend hands it a checked IP
    (and refuses unix sockets itself)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2 signature)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol, host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError:
            raise httpcore2.ConnectTimeout("no connection within the timeout") from None
        except OSError as exc:
            raise httpcore2.ConnectError(str(exc)) from exc
        for option in socket_options or ():
            transport.get_extra_info("socket").setsockopt(*option)
        return AsyncioStream(protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
