"""What tokensvc is measured against, in the same run: the least a grpc.aio
server can do for the same calls.

- :class:`NoopServer` answers ``GetToken`` (and ``RegisterServer``) with fixed
  bytes: no lookup, no authentication, no audit. A GetToken served from memory
  can only come close to it.
- :class:`BroadcastServer` sends each published message to every open stream,
  serialized once, the way a perfect fan-out would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from tokensvc.v1 import tokensvc_pb2 as pb

TOKEN_SERVICE = "tokensvc.v1.TokenService"
ADMIN_SERVICE = "tokensvc.v1.AdminService"


class NoopServer:
    """GetToken and RegisterServer answered with fixed bytes, on 127.0.0.1."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self.server = grpc.aio.server()
        self.port = 0

    async def _fixed(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return self._answer

    async def start(self) -> str:
        unary = grpc.unary_unary_rpc_method_handler(self._fixed)
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(TOKEN_SERVICE, {"GetToken": unary}),
                grpc.method_handlers_generic_handler(ADMIN_SERVICE, {"RegisterServer": unary}),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(0)


class BroadcastServer:
    """A WatchTokens look-alike: every stream gets each published TokenEvent."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._opened = asyncio.Condition()
        self._sequence = 0
        self.port = 0

    async def _watch(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        async with self._opened:
            self._queues.add(queue)
            self._opened.notify_all()
        try:
            yield pb.TokenEvent(sequence=1, synced=pb.Synced()).SerializeToString()
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)

    async def wait_for_streams(self, count: int) -> None:
        async with self._opened:
            await self._opened.wait_for(lambda: len(self._queues) >= count)

    def publish(self, version: int) -> None:
        """One token event, stamped now, to every stream."""
        self._sequence += 1
        token = pb.Token(server_id="bench", access_token="x" * 800, version=version)
        token.issued_at.FromNanoseconds(time.time_ns())
        data = pb.TokenEvent(sequence=self._sequence, token=token).SerializeToString()
        for queue in self._queues:
            queue.put_nowait(data)

    async def start(self) -> str:
        handler = grpc.unary_stream_rpc_method_handler(self._watch)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(TOKEN_SERVICE, {"WatchTokens": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self.server.stop(0)
