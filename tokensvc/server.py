"""Assembles the service: keys, store, fetcher, manager, and the grpc.aio
servers (tokensvc.listeners) with reflection, health, metrics and graceful
shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import signal
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
from envoy.service.secret.v3 import sds_pb2, sds_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tokensvc import __version__, metrics
from tokensvc.api import AdminServicer, TokenServicer
from tokensvc.api.sds import SecretDiscoveryServicer
from tokensvc.api.wire import add_token_service
from tokensvc.assertions import AssertionDir
from tokensvc.audit import AuditLog
from tokensvc.auth import Authenticator
from tokensvc.consumers import ConsumerRegistry
from tokensvc.crypto import KeyRing, load_keyring
from tokensvc.discovery import discover
from tokensvc.egress import Egress
from tokensvc.errors import ConfigurationError, StoreUnavailable
from tokensvc.listeners import listening
from tokensvc.manager import TokenManager
from tokensvc.oauth import TokenFetcher
from tokensvc.ownership import Heartbeat, Membership
from tokensvc.registry import Callers, Registry
from tokensvc.settings import Settings
from tokensvc.store import Store, create_engine, migrate
from tokensvc.store.access import AccessStore
from tokensvc.store.consumers import ConsumerStore
from tokensvc.store.engine import lock_sqlite
from tokensvc.store.notify import Change, ChangeKind, Listener
from tokensvc.token import Clock, utcnow
from tokensvc.v1 import tokensvc_pb2, tokensvc_pb2_grpc

log = logging.getLogger(__name__)

# How often the database is checked, for grpc.health.v1.
STORE_CHECK_INTERVAL = 2.0

ADMIN_SERVICE = tokensvc_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SERVICE_NAMES = (
    tokensvc_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name,
    ADMIN_SERVICE,
    sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"].full_name,
)


async def open_store(
    settings: Settings, keyring: KeyRing, clock: Clock = utcnow, origin: str = ""
) -> Store:
    """Opens the database: SQLite is migrated in place; PostgreSQL must already
    be current (``tokensvc migrate``), since replicas must not race to migrate."""
    engine = create_engine(settings.effective_database_url)
    try:
        if settings.is_sqlite:
            await migrate.upgrade(engine)
        else:
            await migrate.require_current(engine)
        store = Store(engine, keyring, clock, origin)
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
    # Every outbound request; tests give one with a scripted resolver.
    egress: Egress | None = None
    # Off in tests that drive the schedule themselves with a fake clock.
    run_scheduler: bool = True
    port: int = 0
    replica_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    store: Store | None = field(default=None, init=False)
    manager: TokenManager | None = field(default=None, init=False)
    admin_port: int = 0  # admin_listen's port, when set
    _servers: list[grpc.aio.Server] = field(default_factory=list, init=False)
    _health: health.aio.HealthServicer | None = field(default=None, init=False)
    _listener: Listener | None = field(default=None, init=False)
    _heartbeat: Heartbeat | None = field(default=None, init=False)
    _monitor: asyncio.Task[None] | None = field(default=None, init=False)
    _sqlite_lock: int | None = field(default=None, init=False)
    _metrics: metrics.MetricsListener | None = field(default=None, init=False)
    auth: Authenticator | None = field(default=None, init=False)
    audit: AuditLog | None = field(default=None, init=False)
    # Which Envoy node holds which secret version (Envoy SDS).
    consumers: ConsumerRegistry | None = field(default=None, init=False)

    async def start(self) -> int:
        try:
            return await self._start()
        except BaseException:
            await self.stop(grace=0)
            raise

    async def _start(self) -> int:
        settings = self.settings
        if settings.is_sqlite:
            self._sqlite_lock = lock_sqlite(settings.effective_database_url)
        # Changes are announced under a random origin, so that replicas that
        # share a hostname and pid (containers) still hear each other.
        origin = f"{self.replica_id}:{secrets.token_hex(4)}"
        self.store = await open_store(settings, keyring_for(settings), self.clock, origin)
        assertions = AssertionDir(settings.assertion_dir, self.clock)
        if self.egress is None:
            self.egress = Egress(
                settings.url_policy,
                timeout=settings.http_timeout,
                max_response_bytes=settings.max_response_bytes,
                user_agent=f"tokensvc/{__version__} ({self.replica_id})",
                ca_file=settings.outbound_ca_file,
            )
        policy = self.egress.policy
        if self.fetcher is None:
            self.fetcher = TokenFetcher(
                self.egress,
                default_lifetime=settings.default_lifetime,
                clock=self.clock,
                assertions=assertions,
            )
        self.manager = TokenManager(
            self.store,
            self.fetcher.fetch,
            clock=self.clock,
            min_valid_for=settings.default_min_valid_for,
            policy=settings.refresh_policy,
            min_forced_refresh_interval=timedelta(seconds=settings.min_forced_refresh_interval),
            fetch_concurrency=settings.fetch_concurrency,
            discover=functools.partial(
                discover, get=self.egress.get, policy=policy, clock=self.clock
            ),
            membership=Membership(origin),  # alone on SQLite: it owns every server
            takeover=settings.heartbeat_ttl + settings.heartbeat_interval,
        )
        self._heartbeat = Heartbeat.of(self.store, self.manager, settings)
        metrics.configure(per_server=settings.metrics_per_server)
        server, self.port = listening(settings, "listen", settings.listen)
        # Each listener with the services it serves: AdminService on its own,
        # or with everything else.
        listeners: list[tuple[grpc.aio.Server, tuple[str, ...]]] = [(server, SERVICE_NAMES)]
        admin = server
        if settings.admin_listen:
            admin, self.admin_port = listening(settings, "admin_listen", settings.admin_listen)
            others = tuple(name for name in SERVICE_NAMES if name != ADMIN_SERVICE)
            listeners = [(server, others), (admin, (ADMIN_SERVICE,))]
        if settings.metrics_listen:
            try:
                self._metrics = metrics.MetricsListener(settings.metrics_listen)
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot listen on metrics_listen {settings.metrics_listen}: {exc.strerror}"
                ) from None
        access = AccessStore(self.store.transactions)
        certs = settings.tls_client_ca is not None  # else no call can present one
        self.auth = Authenticator(
            access, open_allowed=settings.listens_on_loopback, clock=self.clock, certificates=certs
        )
        await self.auth.load()
        self.audit = AuditLog(
            access, self.auth, timedelta(days=settings.audit_retention_days), self.clock
        )
        self.audit.start()
        await self._heartbeat.join()  # who else is live, before scheduling
        await self.manager.start(self.run_scheduler)
        self._heartbeat.start()
        if self.store.shared:
            self._listener = Listener(
                settings.effective_database_url,
                origin,
                self._apply,
                self.manager.replication.resync,
            )
            self._listener.start()
        shared = ConsumerStore(self.store.engine) if self.store.shared else None
        self.consumers = ConsumerRegistry(shared, origin, self.clock)
        self.consumers.start()
        add_token_service(TokenServicer(self.manager, self.auth, self.audit, self.clock), server)
        tokensvc_pb2_grpc.add_AdminServiceServicer_to_server(
            AdminServicer(
                Registry(self.store, self.manager, self.egress, self.fetcher.fetch, assertions),
                Callers(
                    access,
                    self.store,
                    reload=self.auth.load,
                    end_watches=self.manager.watches.end,
                    clock=self.clock,
                ),
                self.auth,
                self.consumers,
            ),
            admin,
        )
        sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(
            SecretDiscoveryServicer(
                self.manager, self.auth, self.audit, self.consumers.local, self.clock
            ),
            server,
        )
        self._health = health.aio.HealthServicer()
        for listener, names in listeners:
            health_pb2_grpc.add_HealthServicer_to_server(self._health, listener)
            if settings.reflection:
                reflection.enable_server_reflection(
                    (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), listener
                )
            await listener.start()
            self._servers.append(listener)
        # SERVING only now: the store is open and the port bound.
        await self._set_health(True)
        metrics.database_up(True)
        self._monitor = asyncio.create_task(self._watch_store(), name="store-health")
        if settings.insecure and not settings.listens_on_loopback and not settings.tls_cert:
            log.warning(
                "INSECURE: serving plaintext gRPC off loopback; tokens and keys cross the "
                "network unencrypted",
                extra={"listen": settings.listen, "admin_listen": settings.admin_listen},
            )
        if self.auth.open:
            log.warning(
                "no caller is configured: anything on this host may call tokensvc; "
                "create an admin key (tokensvc create-caller) to require authentication"
            )
        log.info(
            "tokensvc serving",
            extra={
                "listen": settings.listen,
                "port": self.port,
                "admin_port": self.admin_port,
                "sqlite": settings.is_sqlite,
                "replica": self.replica_id,
                "metrics_port": self.metrics_port,
            },
        )
        return self.port

    @property
    def metrics_port(self) -> int:
        """The port of /metrics (0: off)."""
        return self._metrics.port if self._metrics is not None else 0

    async def _apply(self, change: Change) -> None:
        """A change made on another replica."""
        assert self.manager is not None and self.auth is not None
        if change.kind is ChangeKind.REPLICAS:
            return self._heartbeat.poke() if self._heartbeat is not None else None
        if change.kind is not ChangeKind.CALLERS:
            await self.manager.replication.apply(change)
            return
        await self.auth.load()
        for owner in self.manager.watches.owners() - self.auth.caller_ids:
            self.manager.watches.end(owner)  # revoked elsewhere: its streams end here too

    async def _set_health(self, serving: bool) -> None:
        assert self._health is not None
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def _watch_store(self) -> None:
        """NOT_SERVING while the database is unreachable (tokens still valid are
        served from memory meanwhile); back to SERVING, and caught up, when it
        returns. Nothing to restart by hand."""
        assert self.store is not None and self.manager is not None
        healthy = True
        while True:
            await asyncio.sleep(STORE_CHECK_INTERVAL)
            try:
                await asyncio.wait_for(self.store.ping(), STORE_CHECK_INTERVAL)
                up = True
            except Exception as exc:  # whatever it is, the database is not serving us
                log.debug("database check failed", extra={"exc_type": type(exc).__name__})
                up = False
            if up == healthy:
                continue
            healthy = up
            metrics.database_up(up)
            await self._set_health(up)
            if up:
                log.info("database reachable again: serving")
                with contextlib.suppress(StoreUnavailable):
                    await self.manager.replication.resync()
            else:
                log.warning("database unreachable: NOT_SERVING, valid tokens served from memory")

    async def wait(self) -> None:
        if self._servers:
            await self._servers[0].wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, ends watch streams, lets calls in progress finish
        within the grace period, then closes the HTTP client and the database."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
            self._monitor = None
        if self.manager is not None:
            self.manager.watches.close()  # watch streams end with OK; clients reconnect
        if self._servers:
            grace = self.settings.grace_period if grace is None else grace
            await asyncio.gather(*(server.stop(grace) for server in self._servers))
            self._servers = []
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self.manager is not None:
            await self.manager.stop()
            self.manager = None
        if self._heartbeat is not None:
            await self._heartbeat.stop()  # after the last refresh here: the others take over
            self._heartbeat = None
        if self.audit is not None:
            await self.audit.stop()
            self.audit = None
        if self.consumers is not None:
            await self.consumers.stop()
            self.consumers = None
        if self.fetcher is not None:
            await self.fetcher.aclose()
            self.fetcher = None
        if self.egress is not None:
            await self.egress.aclose()
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._sqlite_lock is not None:
            os.close(self._sqlite_lock)  # releases the lock
            self._sqlite_lock = None
        log.info("tokensvc stopped")


async def until_signalled() -> None:
    """Returns on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    stopping = asyncio.create_task(until_signalled())
    service = Service(settings)
    await service.start()
    try:
        waiter = asyncio.create_task(service.wait())
        await asyncio.wait([waiter, stopping], return_when=asyncio.FIRST_COMPLETED)
        log.info("shutting down", extra={"grace_seconds": settings.grace_period})
    finally:
        await service.stop()
