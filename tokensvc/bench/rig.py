"""The parts a benchmark runs: an authorization server in a process of its own
(so that tokensvc's CPU can be measured apart from it) and tokensvc itself."""

from __future__ import annotations

import asyncio
import multiprocessing
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc

from tokensvc.server import Service
from tokensvc.settings import Settings
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

CLIENT_ID = "bench-client"
SECRET = "bench-secret"


class AuthServerProcess:
    """tokensvc's demo authorization server, issuing tokens of ``lifetime``
    seconds, in its own process; ``requests()`` counts token requests so far."""

    def __init__(self, lifetime: float) -> None:
        self._lifetime = lifetime
        self._conn: Connection | None = None
        self._process: Any = None
        self.token_endpoint = ""

    async def __aenter__(self) -> Self:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self._lifetime), daemon=True)
        self._process.start()
        self.token_endpoint = await self._ask("url")
        return self

    async def requests(self) -> int:
        count: int = await self._ask("count")
        return count

    async def _ask(self, command: str) -> Any:
        assert self._conn is not None
        conn = self._conn
        conn.send(command)
        return await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._conn is not None:
            self._conn.send("stop")
        if self._process is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._process.join, 10)


def _serve(conn: Connection, lifetime: float) -> None:
    asyncio.run(_serve_async(conn, lifetime))


async def _serve_async(conn: Connection, lifetime: float) -> None:
    from tokensvc.demo.authserver import AuthServer, Behaviour

    async with AuthServer(behaviour=Behaviour(lifetime=lifetime)) as auth:
        auth.add_client(CLIENT_ID, SECRET)
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, conn.recv)) != "stop":
            conn.send(auth.token_endpoint if command == "url" else auth.token_requests)


class Rig:
    """A tokensvc on 127.0.0.1:<free port> with its stubs, SQLite in a temporary directory."""

    def __init__(self, service: Service, channel: grpc.aio.Channel, token_endpoint: str) -> None:
        self.service = service
        self.channel = channel
        self.token_endpoint = token_endpoint
        self.tokens = pb_grpc.TokenServiceStub(channel)
        self.admin = pb_grpc.AdminServiceStub(channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    def registration(self, server_id: str) -> pb.RegisterServerRequest:
        return pb.RegisterServerRequest(
            server=pb.Server(
                id=server_id,
                mcp_url=f"http://127.0.0.1:9/{server_id}/mcp",
                token_endpoint=self.token_endpoint,
                client_id=CLIENT_ID,
            ),
            client_secret=SECRET,
        )

    async def register(self, server_ids: list[str], concurrency: int = 32) -> None:
        pending = iter(server_ids)

        async def worker() -> None:
            for server_id in pending:
                await self.admin.RegisterServer(self.registration(server_id))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


@asynccontextmanager
async def tokensvc(auth: AuthServerProcess, **settings: Any) -> AsyncIterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="tokensvc-bench-") as data:
        service = Service(
            Settings(listen="127.0.0.1:0", data_dir=Path(data), **settings).validate()
        )
        await service.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        try:
            yield Rig(service, channel, auth.token_endpoint)
        finally:
            await channel.close()
            await service.stop(grace=1.0)
