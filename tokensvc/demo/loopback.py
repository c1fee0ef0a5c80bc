"""An ASGI app served by uvicorn inside the caller's event loop, on a loopback
socket that is bound and listening before ``start`` returns (no waiting for a
port: a request sent before uvicorn's first tick waits in the backlog)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator
from types import TracebackType
from typing import Literal, Self

import uvicorn
from starlette.types import ASGIApp


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # Embedded in someone else's process (pytest, tokensvc demo): signals are theirs.
        yield


class LoopbackServer:
    """Subclasses build their app in ``build_app``, which runs once the address
    (``base_url``) is known, since some apps must know their own URL."""

    lifespan: Literal["on", "off"] = "off"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host, self._port = host, port
        self.base_url = ""
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    def build_app(self) -> ASGIApp:
        raise NotImplementedError

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        family, kind, proto, _, address = socket.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        self.base_url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        config = uvicorn.Config(
            self.build_app(),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan=self.lifespan,
            http="h11",
            ws="none",
            timeout_graceful_shutdown=1,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        task, self._task, self._server = self._task, None, None
        await task  # closes the socket; surfaces a crash of the server

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
