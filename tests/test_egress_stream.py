"""egress's network streams on asyncio transports, over real loopback sockets.

What httpcore2 relies on: an idle connection the server closed says so (it is
not reused), a large answer arrives whole through flow control, a peer that
neither answers nor reads ends in a timeout of the right kind, a refused
connect is a connect error. TLS runs through the same streams in test_mtls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpcore2
import pytest

from tokensvc.egress.stream import HIGH_WATER, AsyncioBackend, AsyncioStream

from support import eventually

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _serve(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _connect(port: int) -> AsyncioStream:
    stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
    assert isinstance(stream, AsyncioStream)
    return stream


async def test_an_idle_connection_says_when_the_server_closed_it() -> None:
    close = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await close.wait()
        writer.close()

    async with _serve(handler) as port:
        stream = await _connect(port)
        assert stream.get_extra_info("is_readable") is False
        close.set()
        await eventually(lambda: bool(stream.get_extra_info("is_readable")), within=10)
        assert await stream.read(100, timeout=1) == b""
        await stream.aclose()


async def test_bytes_arriving_on_an_idle_connection_make_it_readable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"unasked")
        await reader.read()

    async with _serve(handler) as port:
        stream = await _connect(port)
        await eventually(lambda: bool(stream.get_extra_info("is_readable")), within=10)
        assert await stream.read(100, timeout=1) == b"unasked"
        await stream.aclose()


async def test_a_large_answer_arrives_whole_through_flow_control() -> None:
    payload = bytes(range(256)) * (4 * HIGH_WATER // 256)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    async with _serve(handler) as port:
        stream = await _connect(port)
        # The reader stops the transport past HIGH_WATER until it is read.
        await eventually(lambda: stream._protocol.reading_paused, within=10)
        received = bytearray()
        while chunk := await stream.read(65536, timeout=5):
            received += chunk
        assert bytes(received) == payload
        await stream.aclose()


async def test_a_peer_that_never_answers_is_a_read_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with _serve(handler) as port:
        stream = await _connect(port)
        started = time.monotonic()
        with pytest.raises(httpcore2.ReadTimeout):
            await stream.read(100, timeout=0.2)
        assert time.monotonic() - started < 5
        await stream.aclose()


async def test_a_peer_that_never_reads_is_a_write_timeout() -> None:
    stop = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()  # reads nothing: the kernel's buffers fill up

    async with _serve(handler) as port:
        stream = await _connect(port)
        with pytest.raises(httpcore2.WriteTimeout):
            async with asyncio.timeout(30):
                while True:
                    await stream.write(b"x" * (1 << 20), timeout=0.2)
        stop.set()
        await stream.aclose()


async def test_a_refused_connect_is_a_connect_error_with_its_cause() -> None:
    async with _serve(lambda reader, writer: asyncio.sleep(0)) as port:
        pass  # the server is closed: its port refuses
    with pytest.raises(httpcore2.ConnectError) as caught:
        await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
    assert isinstance(caught.value.__cause__, OSError)
