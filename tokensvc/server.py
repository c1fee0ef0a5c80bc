"""Assembles the service: keys, store, fetcher, manager, and the grpc.aio server
with reflection, health and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokensvc.api import AdminServicer, TokenServicer
from tokensvc.crypto import KeyRing, load_keyring
from tokensvc.errors import ConfigurationError
from tokensvc.manager import TokenManager
from tokensvc.oauth import TokenFetcher
from tokensvc.registration import UrlPolicy
from tokensvc.settings import Settings
from tokensvc.store import Store, create_engine, migrate
from tokensvc.token import Clock, utcnow
from tokensvc.v1 import tokensvc_pb2, tokensvc_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    tokensvc_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name,
    tokensvc_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


async def open_store(settings: Settings, keyring: KeyRing, clock: Clock = utcnow) -> Store:
    """Opens the database: SQLite is migrated in place; PostgreSQL must already
    be current (``tokensvc migrate``), since replicas must not race to migrate."""
    engine = create_engine(settings.effective_database_url)
    try:
        if settings.is_sqlite:
            await migrate.upgrade(engine)
        else:
            await migrate.require_current(engine)
        store = Store(engine, keyring, clock)
        await store.check_keys()
    except BaseException:
        await engine.dispose()
        raise
    return store


def keyring_for(settings: Settings) -> KeyRing:
    keyring, created = load_keyring(settings.keys, settings.effective_key_file)
    if created:
        log.warning(
            "created a new encryption key file: back it up, the stored credentials "
            "cannot be read without it",
            extra={"path": str(settings.effective_key_file)},
        )
    return keyring


@dataclass
class Service:
    """One tokensvc process. ``start`` binds and serves; ``stop`` drains."""

    settings: Settings
    clock: Clock = utcnow
    fetcher: TokenFetcher | None = None
    # Off in tests that drive the schedule themselves with a fake clock.
    run_scheduler: bool = True
    port: int = 0
    store: Store | None = field(default=None, init=False)
    manager: TokenManager | None = field(default=None, init=False)
    _server: grpc.aio.Server | None = field(default=None, init=False)
    _health: health.aio.HealthServicer | None = field(default=None, init=False)

    async def start(self) -> int:
        settings = self.settings
        self.store = await open_store(settings, keyring_for(settings), self.clock)
        policy = UrlPolicy(allow_insecure_http=settings.allow_insecure_http)
        if self.fetcher is None:
            self.fetcher = TokenFetcher(
                timeout=settings.http_timeout,
                max_response_bytes=settings.max_response_bytes,
                default_lifetime=settings.default_lifetime,
                url_policy=policy,
                clock=self.clock,
            )
        self.manager = TokenManager(
            self.store,
            self.fetcher.fetch,
            clock=self.clock,
            min_valid_for=settings.default_min_valid_for,
            policy=settings.refresh_policy,
        )
        await self.manager.start(self.run_scheduler)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 1 << 20),
                ("grpc.so_reuseport", 0),
            ]
        )
        tokensvc_pb2_grpc.add_TokenServiceServicer_to_server(TokenServicer(self.manager), server)
        tokensvc_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(self.store, self.manager, policy), server
        )
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = server.add_insecure_port(settings.listen)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            await self.store.close()
            raise ConfigurationError(
                f"cannot listen on {settings.listen}: address in use or invalid"
            )
        await server.start()
        self._server = server
        # SERVING only now: the store is open and the port bound.
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "tokensvc serving",
            extra={"listen": settings.listen, "port": self.port, "sqlite": settings.is_sqlite},
        )
        return self.port

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, lets calls in progress finish within the grace
        period, then closes the HTTP client and the database."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.manager is not None:
            self.manager.bus.close()  # watch streams end with OK; clients reconnect
        if self._server is not None:
            await self._server.stop(self.settings.grace_period if grace is None else grace)
            self._server = None
        if self.manager is not None:
            await self.manager.stop()
        if self.fetcher is not None:
            await self.fetcher.aclose()
        if self.store is not None:
            await self.store.close()
            self.store = None
        log.info("tokensvc stopped")


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    service = Service(settings)
    await service.start()
    try:
        waiter = asyncio.create_task(service.wait())
        await asyncio.wait(
            [waiter, asyncio.create_task(stopping.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        log.info("shutting down", extra={"grace_seconds": settings.grace_period})
    finally:
        await service.stop()
