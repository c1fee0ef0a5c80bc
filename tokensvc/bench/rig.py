"""The parts a benchmark runs: an authorization server in a process of its own
(so that tokensvc's CPU can be measured apart from it) and tokensvc itself."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokensvc.bench import load
from tokensvc.bench.load import CLIENT_ID, SECRET
from tokensvc.server import Service
from tokensvc.settings import Settings
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc


class AuthServerProcess:
    """tokensvc's demo authorization server, issuing tokens of ``lifetime``
    seconds and answering each token request ``delay`` seconds after it came
    (0: at once), in its own process; ``requests()`` counts token requests so far."""

    def __init__(self, lifetime: float, delay: float = 0.0) -> None:
        self._lifetime = lifetime
        self._delay = delay
        self._conn: Connection | None = None
        self._process: Any = None
        self.token_endpoint = ""

    async def __aenter__(self) -> Self:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, self._lifetime, self._delay), daemon=True
        )
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


def _serve(conn: Connection, lifetime: float, delay: float) -> None:
    asyncio.run(_serve_async(conn, lifetime, delay))


async def _serve_async(conn: Connection, lifetime: float, delay: float) -> None:
    from tokensvc.demo.authserver import AuthServer, Behaviour

    async with AuthServer(behaviour=Behaviour(lifetime=lifetime, delay=delay)) as auth:
        auth.add_client(CLIENT_ID, SECRET)
        loop = asyncio.get_running_loop()
        while (command := await loop.run_in_executor(None, conn.recv)) != "stop":
            conn.send(auth.token_endpoint if command == "url" else auth.token_requests)


class Rig:
    """A tokensvc on 127.0.0.1:``port`` (AdminService on ``admin_port``, if
    another), its stubs, and how to register servers with it."""

    def __init__(
        self,
        port: int,
        channel: grpc.aio.Channel,
        token_endpoint: str,
        admin_port: int = 0,
        admin_channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.port = port
        self.admin_port = admin_port or port
        self.channel = channel
        self.token_endpoint = token_endpoint
        self.tokens = pb_grpc.TokenServiceStub(channel)
        self.admin = pb_grpc.AdminServiceStub(admin_channel or channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_target(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

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

    async def fill(
        self, server_ids: list[str], probe_every: float = 0.0
    ) -> tuple[float, list[tuple[float, float]]]:
        """Registers the servers from a process of its own (the admin is a
        client elsewhere, as for every measure's load) and returns once each
        has its first token: the seconds that took, and the probes of a
        broker meanwhile, one every ``probe_every`` seconds (see load.fill)."""
        requests = [self.registration(server_id).SerializeToString() for server_id in server_ids]
        filled: tuple[float, list[tuple[float, float]]] = await load.in_process_async(
            load.fill,
            self.target,
            self.admin_target,
            requests,
            32,
            probe_every,
            self.token_endpoint,
        )
        return filled


@asynccontextmanager
async def tokensvc(auth: AuthServerProcess, **settings: Any) -> AsyncIterator[Rig]:
    """tokensvc in this process (so that its CPU is this process's), on SQLite,
    with AdminService on a listener of its own (as the README advises for
    registering in bulk: admin calls then never queue ahead of GetToken)."""
    with tempfile.TemporaryDirectory(prefix="tokensvc-bench-") as data:
        settings = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0", **settings}
        service = Service(Settings(data_dir=Path(data), **settings).validate())
        await service.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        admin_port = service.admin_port or service.port
        admin = grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}")
        try:
            yield Rig(service.port, channel, auth.token_endpoint, admin_port, admin)
        finally:
            await channel.close()
            await admin.close()
            await service.stop(grace=1.0)


class ServeProcess:
    """``tokensvc serve`` as a process of its own, on a free loopback port;
    ``cpu_seconds`` reads its user + system time from /proc (Linux)."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        with socket.socket() as probe:  # a free port; the race is harmless in a bench
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokensvc.cli",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60)
        return self

    def cpu_seconds(self) -> float:
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
