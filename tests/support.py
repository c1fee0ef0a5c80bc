"""Fixtures shared by the tests: databases (SQLite and a fresh PostgreSQL
database per test), key rings, stores."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, quote_plus

import asyncpg
import grpc
import h11
import httpcore2
import httpx2
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tokensvc.crypto import KeyRing, generate_key_entry
from tokensvc.demo.authserver import AuthServer
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.egress import Egress, UrlPolicy, is_loopback
from tokensvc.egress.stream import AsyncioBackend
from tokensvc.fallbacks import Fetch
from tokensvc.manager import TokenManager
from tokensvc.registration import Credential, CredentialKind, ServerSpec
from tokensvc.registry import Callers
from tokensvc.server import Service, keyring_for, open_store
from tokensvc.settings import Settings
from tokensvc.store import Store, create_engine, migrate
from tokensvc.store.access import AccessStore, CallerRecord
from tokensvc.token import Clock, Secret, utcnow
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

PG_DSN = os.environ.get("TOKENSVC_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def unavailable(part: str, reason: str) -> NoReturn:
    """Skips the test for want of ``part`` (PG, INTEROP, ENVOY, IMAGE), or fails
    it where TOKENSVC_TEST_REQUIRE_<part>=1 says it can run (CI sets them)."""
    variable = f"TOKENSVC_TEST_REQUIRE_{part}"
    if os.environ.get(variable) == "1":
        pytest.fail(f"{reason} ({variable}=1)")
    pytest.skip(reason)


async def _pg_admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        why = f"PostgreSQL not reachable at {PG_DSN} ({exc}); CI starts it"
    unavailable("PG", why)


async def create_pg_database() -> str:
    """Creates a fresh database; returns its SQLAlchemy URL."""
    name = f"tokensvc_test_{secrets.token_hex(6)}"
    admin = await _pg_admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = await _pg_admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/tokensvc.db"
        return
    url = await create_pg_database()
    try:
        yield url
    finally:
        await drop_pg_database(url)


@pytest.fixture
def key_entry() -> str:
    return generate_key_entry()


@pytest.fixture
def keyring(key_entry: str) -> KeyRing:
    return KeyRing.parse(key_entry)


@pytest.fixture
async def store(database_url: str, keyring: KeyRing) -> AsyncIterator[Store]:
    engine = create_engine(database_url)
    await migrate.upgrade(engine)
    store = Store(engine, keyring)
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def manager_over(
    path: Path, fetch: Fetch, clock: Clock, server_ids: Sequence[str], **options: Any
) -> AsyncIterator[TokenManager]:
    """A TokenManager on SQLite under ``path`` with a test's own ``fetch`` (no
    authorization server), the servers ``server_ids`` registered, and its
    schedule driven by the test (``options`` go to TokenManager)."""
    engine = create_engine(f"sqlite+aiosqlite:///{path}/t.db")
    await migrate.upgrade(engine)
    store = Store(engine, KeyRing.parse(generate_key_entry()), clock)
    manager = TokenManager(store, fetch, clock=clock, **options)
    await manager.start(run_scheduler=False)
    for sid in server_ids:
        spec = ServerSpec(sid, f"https://{sid}.example/mcp", "https://as/token", "c")
        result = await store.register(spec, Credential(CredentialKind.CLIENT_SECRET, Secret("s")))
        manager.registered(result.record, result.revised)
    try:
        yield manager
    finally:
        await manager.stop()
        await store.close()


async def eventually(
    done: Callable[[], bool | Awaitable[bool]], *, within: float = 30, interval: float = 0.02
) -> None:
    """Until ``done()``: for state another task or process changes, and that
    nothing announces (Envoy's admin, what a server task read from a stream,
    rows of pg_locks). Everything else is awaited."""
    async with asyncio.timeout(within):
        while True:
            result = done()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(interval)


class FakeClock:
    """The one injected clock of the tests: it moves only when told to.

    ``FakeClock(T0)`` starts at T0, ``FakeClock()`` at the real now, and
    ``FakeClock(real_until_moved=True)`` reads real time until a test sets
    ``now`` or advances it. ``timestamp`` is the float view (seconds since the
    epoch) for code that counts time as ``time.time`` does.
    """

    def __init__(self, now: datetime | None = None, *, real_until_moved: bool = False) -> None:
        self._now = None if real_until_moved else (now or utcnow())

    @property
    def now(self) -> datetime:
        return utcnow() if self._now is None else self._now

    @now.setter
    def now(self, value: datetime) -> None:
        self._now = value

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now = self.now + timedelta(seconds=seconds)

    def timestamp(self) -> float:
        return self.now.timestamp()


# --- outbound requests: a scripted resolver, and a record of every connect -------


class ScriptedResolver:
    """Answers each name from a script: the n-th lookup of a name gets the
    n-th answer (the last one repeats). Unscripted names do not resolve."""

    def __init__(self, **answers: list[list[str]]) -> None:
        self.answers = {name.replace("_", "."): script for name, script in answers.items()}
        self.lookups: list[str] = []

    def script(self, name: str, *answers: list[str]) -> None:
        self.answers[name] = list(answers)

    async def __call__(self, host: str, port: int) -> list[str]:
        script = self.answers.get(host)
        if not script:
            raise OSError(f"{host} is not scripted")
        answer = script[min(self.lookups.count(host), len(script) - 1)]
        self.lookups.append(host)
        return answer


class RecordingNetwork(httpcore2.AsyncNetworkBackend):
    """The network under egress: records the address of every connect and
    really connects only to loopback; anything else is recorded and refused,
    so a test can never send a packet off this host.

    While ``stalled``, no answer comes: a read on any connection, old or new,
    fails as a read that timed out, at once. The timeout is the network's
    verdict, not a wait of real seconds (see ``_StallableStream``)."""

    def __init__(self) -> None:
        self._inner = AsyncioBackend()
        self.connects: list[str] = []
        self.stalled = False
        self.stalled_reads = 0

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2's signature)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore2.AsyncNetworkStream:
        self.connects.append(host)
        if not is_loopback(ipaddress.ip_address(host)):
            raise httpcore2.ConnectError(f"test network: {host} is not loopback")
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _StallableStream(stream, self)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)

    @property
    def off_loopback(self) -> list[str]:
        return [h for h in self.connects if not is_loopback(ipaddress.ip_address(h))]


class _StallableStream(httpcore2.AsyncNetworkStream):
    """A real connection whose reads time out at once while its network is
    stalled: what a read that waited ``timeout`` seconds for an answer that
    never came ends with, without the wait."""

    def __init__(self, inner: httpcore2.AsyncNetworkStream, network: RecordingNetwork) -> None:
        self._inner = inner
        self._network = network

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self._network.stalled:
            self._network.stalled_reads += 1
            raise httpcore2.ReadTimeout(f"test network: stalled (no answer within {timeout} s)")
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2's signature)
    ) -> httpcore2.AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return _StallableStream(tls, self._network)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class HandlerNetwork(httpcore2.AsyncNetworkBackend):
    """A network whose every connection is answered by ``handler``, for what
    no real authorization server sends (an endless body, a redirect,
    cookies). Each request is read, and its answer written, by h11 as a
    server would; the body an answer streams arrives one chunk per read, as
    a slow server's would. ``connects`` records every address connected to."""

    def __init__(self, handler: Callable[[httpx2.Request], httpx2.Response]) -> None:
        self.handler = handler
        self.connects: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore2's signature)
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore2.AsyncNetworkStream:
        self.connects.append(host)
        return _HandlerStream(self.handler, f"{host}:{port}")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class _HandlerStream(httpcore2.AsyncNetworkStream):
    def __init__(self, handler: Callable[[httpx2.Request], httpx2.Response], where: str) -> None:
        self._handler, self._where = handler, where
        self._server = h11.Connection(h11.SERVER)
        self._request: h11.Request | None = None
        self._body = b""
        self._pending = b""
        self._answer: AsyncIterator[bytes] | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if self._answer is not None:  # the client read its answer: what is left frames nothing
            async for _ in self._answer:
                pass
        self._server.receive_data(buffer)
        while (event := self._server.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
            if isinstance(event, h11.Request):
                self._request, self._body = event, b""
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._answer = self._respond()
                return

    async def _respond(self) -> AsyncIterator[bytes]:
        assert self._request is not None
        request = httpx2.Request(
            self._request.method.decode(),
            f"http://{self._where}{self._request.target.decode()}",
            headers=[(k.decode(), v.decode()) for k, v in self._request.headers],
            content=self._body,
        )
        response = self._handler(request)
        headers = [
            (k, v) for k, v in response.headers.raw if k.lower() != b"transfer-encoding"
        ]  # h11 frames a body without a length itself
        yield self._server.send(h11.Response(status_code=response.status_code, headers=headers))
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        async for chunk in response.stream:
            yield self._server.send(h11.Data(data=chunk))
        end = self._server.send(h11.EndOfMessage())
        if self._server.our_state is h11.DONE and self._server.their_state is h11.DONE:
            self._server.start_next_cycle()  # before the client can send the next request
        yield end

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        while not self._pending and self._answer is not None:  # b"" would be the end
            if not (chunk := await anext(self._answer, None)):
                self._answer = None if chunk is None else self._answer
                continue
            self._pending = chunk
        data, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return data

    async def aclose(self) -> None:
        self._answer = None

    def get_extra_info(self, info: str) -> Any:
        return False if info == "is_readable" else None


def scripted_egress(resolver: ScriptedResolver, network: RecordingNetwork, **policy: Any) -> Egress:
    return Egress(UrlPolicy(resolver=resolver, **policy), network=network)


# --- a real service on a real socket, with a real authorization server ----------

SECRET = "cs-Sup3r:Secret+%é€-7f1a"  # : + % and non-ASCII, through client_secret_basic
CLIENT_ID = "broker-client"


@dataclass
class Harness:
    """One tokensvc on 127.0.0.1:<free port>, its stubs, and the authorization server."""

    service: Service
    auth: AuthServer
    channel: grpc.aio.Channel
    tokens: pb_grpc.TokenServiceStub
    admin: pb_grpc.AdminServiceStub
    data_dir: Path
    admin_channel: grpc.aio.Channel  # channel, unless admin_listen is set

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    async def register(
        self, server_id: str = "alpha", secret: str | None = SECRET, **fields: Any
    ) -> pb.Server:
        """``register`` on this service's AdminService and authorization server."""
        return await register(self.admin, self.auth, server_id, secret, **fields)


Metadata = tuple[tuple[str, str], ...]


def bearer(key: str) -> Metadata:
    """The call metadata that carries a caller's key."""
    return (("authorization", f"Bearer {key}"),)


class CallContext:
    """What Authenticator reads of a grpc.aio call: its peer and its metadata
    (the key's, if any)."""

    def __init__(self, peer: str, key: str = "") -> None:
        self._peer, self._metadata = peer, bearer(key) if key else ()

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def registration(
    auth: AuthServer, server_id: str = "alpha", secret: str | None = SECRET, **fields: Any
) -> pb.RegisterServerRequest:
    """A RegisterServerRequest for a client of ``auth`` (CLIENT_ID, ``secret``).
    ``fields`` of RegisterServerRequest (another credential, expected_revision...)
    go to the request, the rest to Server (``token_endpoint=""``: discovered)."""
    named = pb.RegisterServerRequest.DESCRIPTOR.fields_by_name
    outer = {name: fields.pop(name) for name in list(fields) if name in named}
    server = pb.Server(
        id=server_id,
        mcp_url=fields.pop("mcp_url", f"http://127.0.0.1:9/{server_id}/mcp"),
        token_endpoint=fields.pop("token_endpoint", auth.token_endpoint),
        client_id=fields.pop("client_id", CLIENT_ID),
        **fields,
    )
    request = pb.RegisterServerRequest(server=server, **outer)
    if secret is not None:
        request.client_secret = secret
    return request


async def register(
    admin: pb_grpc.AdminServiceStub,
    auth: AuthServer,
    server_id: str = "alpha",
    secret: str | None = SECRET,
    *,
    metadata: Metadata = (),
    **fields: Any,
) -> pb.Server:
    """Registers ``registration(auth, server_id, secret, **fields)`` through
    AdminService (of a Harness or of a replica), as the caller ``metadata`` says."""
    request = registration(auth, server_id, secret, **fields)
    server: pb.Server = await admin.RegisterServer(request, metadata=metadata or None, timeout=30)
    return server


async def first_keys(
    admin: pb_grpc.AdminServiceStub, *patterns: str, broker: str = "envoy"
) -> tuple[str, str]:
    """Through AdminService/CreateCaller: an admin key (open mode ends with
    it), then, as that admin, a broker key for the servers ``patterns`` name."""
    created = await admin.CreateCaller(pb.CreateCallerRequest(name="admin", roles=["admin"]))
    broker_key = await admin.CreateCaller(
        pb.CreateCallerRequest(name=broker, roles=["broker"], server_patterns=patterns),
        metadata=bearer(created.key),
    )
    return created.key, broker_key.key


def callers_of(store: Store) -> Callers:
    """The callers use case on this store, built as the CLI builds it (no
    service to reload: one that serves this store learns of changes from it)."""
    return Callers(AccessStore(store.transactions), store)


async def bootstrap(data_dir: Path, *callers: dict[str, Any]) -> list[tuple[CallerRecord, str]]:
    """Creates callers in the data dir before the service starts, as
    ``tokensvc create-caller`` does: ``{"name", "roles", "patterns", "identity"}``."""
    settings = Settings(data_dir=data_dir)
    store = await open_store(settings, keyring_for(settings))
    try:
        return [
            await callers_of(store).create(
                actor="cli:create-caller",
                name=caller["name"],
                roles=caller["roles"],
                patterns=caller.get("patterns"),
                certificate_identity=caller.get("identity", ""),
            )
            for caller in callers
        ]
    finally:
        await store.close()


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo detail of a failed call."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {error!r}")


@asynccontextmanager
async def running_service(
    data_dir: Path,
    auth: AuthServer,
    *,
    database_url: str = "",
    keys: str = "",
    clock: Clock = utcnow,
    run_scheduler: bool | None = None,
    egress: Egress | None = None,
    **settings: Any,
) -> AsyncIterator[Harness]:
    """A service; with a fake clock, its scheduler is left to the test."""
    settings.setdefault("listen", "127.0.0.1:0")
    service = Service(
        Settings(
            data_dir=data_dir,
            database_url=database_url,
            keys=keys,
            grace_period=1.0,
            **settings,
        ).validate(),
        clock=clock,
        run_scheduler=clock is utcnow if run_scheduler is None else run_scheduler,
        egress=egress,
    )
    await service.start()
    # Its own connection: by default channels to one address share gRPC's global
    # subchannel pool, and after a restart on the same port a new channel would
    # inherit the refused connection's backoff and fail fast with UNAVAILABLE.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}", options=options)
    # With admin_listen, AdminService is on a listener of its own.
    admin = channel
    if service.admin_port:
        admin = grpc.aio.insecure_channel(f"127.0.0.1:{service.admin_port}", options=options)
    try:
        yield Harness(
            service,
            auth,
            channel,
            pb_grpc.TokenServiceStub(channel),
            pb_grpc.AdminServiceStub(admin),
            data_dir,
            admin,
        )
    finally:
        await channel.close()
        if admin is not channel:
            await admin.close()
        await service.stop(grace=1.0)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Puts the root logger's handlers and level back (for tests that call
    logs.configure)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
async def auth() -> AsyncIterator[AuthServer]:
    async with AuthServer() as server:
        server.add_client(CLIENT_ID, SECRET, scopes=("read", "write"))
        yield server


@pytest.fixture
async def harness(tmp_path: Path, auth: AuthServer) -> AsyncIterator[Harness]:
    async with running_service(tmp_path / "data", auth) as h:
        yield h


@pytest.fixture
async def manual(tmp_path: Path, auth: AuthServer) -> AsyncIterator[Harness]:
    """A service whose scheduler does not run: only callers cause fetches."""
    async with running_service(tmp_path / "data", auth, run_scheduler=False) as h:
        yield h


MCP_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "tokensvc-tests", "version": "0"},
    },
}


async def mcp_initialize(
    url: str, access_token: str | None = None, *, authorization: str | None = None
) -> httpx2.Response:
    """What an MCP endpoint answers to a bare initialize request with this
    bearer token, or this whole Authorization header, or none of ours
    (through Envoy, which adds it)."""
    headers = {"Accept": "application/json, text/event-stream"}
    if access_token is not None:
        authorization = f"Bearer {access_token}"
    if authorization is not None:
        headers["Authorization"] = authorization
    async with httpx2.AsyncClient() as client:
        return await client.post(url, json=MCP_INITIALIZE, headers=headers)


async def bearer_call(url: str, access_token: str) -> int:
    """The status an MCP endpoint answers to an initialize request with this token."""
    return (await mcp_initialize(url, access_token)).status_code


async def scrape(port: int) -> str:
    """The Prometheus text of a service's metrics listener."""
    async with httpx2.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert response.status_code == 200, response.status_code
    return response.text


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of ``name`` whose labels include these."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and labels.items() <= found.labels.items():
                return float(found.value)
    return None


@dataclass(frozen=True)
class Seen:
    """A stream message and when this process received it."""

    event: pb.TokenEvent
    monotonic: float
    wall: float

    @property
    def kind(self) -> str:
        return str(self.event.WhichOneof("event"))


class Watcher:
    """A WatchTokens stream read in the background: every event is kept with
    its arrival time and can be awaited. On any TokenService stub: a Harness's
    or a replica's (``name`` says which in a failure)."""

    def __init__(
        self,
        tokens: pb_grpc.TokenServiceStub,
        *server_ids: str,
        metadata: Metadata = (),
        name: str = "watcher",
    ) -> None:
        self.name = name
        self.seen: list[Seen] = []
        self.error: BaseException | None = None
        self._ended = False
        self._changed = asyncio.Condition()
        self.call = tokens.WatchTokens(
            pb.WatchTokensRequest(server_ids=server_ids), metadata=metadata or None
        )
        self.task = asyncio.create_task(self._read(), name=f"watch:{name}")

    async def _read(self) -> None:
        try:
            async for event in self.call:
                async with self._changed:
                    self.seen.append(Seen(event, time.monotonic(), time.time()))
                    self._changed.notify_all()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc  # the status is also the call's: call.code()
        finally:
            async with self._changed:
                self._ended = True
                self._changed.notify_all()

    @property
    def events(self) -> list[pb.TokenEvent]:
        return [s.event for s in self.seen]

    def tokens(self) -> list[Seen]:
        return [s for s in self.seen if s.kind == "token"]

    async def wait_for(
        self, predicate: Callable[[Seen], bool], *, within: float = 30, after: int = 0
    ) -> Seen:
        """The first event from index ``after`` on that satisfies ``predicate``;
        fails if the stream ends first, or after ``within`` seconds."""

        def match() -> Seen | None:
            return next((s for s in self.seen[after:] if predicate(s)), None)

        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: match() is not None or self._ended)
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: no matching event within {within} s; seen: {self.kinds()}"
            ) from None
        found = match()
        if found is None:
            raise AssertionError(f"{self.name} ended ({self.error!r}) before a matching event")
        return found

    async def until(
        self, kind: str, *, within: float = 30, after: int = 0, **match: object
    ) -> pb.TokenEvent:
        """The first event of ``kind`` whose payload has the given fields."""

        def wanted(seen: Seen) -> bool:
            payload = getattr(seen.event, kind)
            return seen.kind == kind and all(getattr(payload, k) == v for k, v in match.items())

        return (await self.wait_for(wanted, within=within, after=after)).event

    def server_ids(self) -> set[str]:
        return {getattr(s.event, s.kind).server_id for s in self.seen if s.kind != "synced"}

    def kinds(self) -> list[str]:
        return [s.kind for s in self.seen]

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def sha(token: str) -> str:
    """The SHA-256 (hex) of a token, as GetToken's ``rejected_token_sha256`` wants it."""
    return hashlib.sha256(token.encode()).hexdigest()


async def rotate(harness: Harness, current: pb.Token) -> pb.Token:
    """Reports ``current`` as rejected: tokensvc fetches and publishes a new one."""
    request = pb.GetTokenRequest(
        server_id=current.server_id, rejected_token_sha256=sha(current.access_token)
    )
    new: pb.Token = await harness.tokens.GetToken(request, timeout=30)
    assert new.version == current.version + 1
    return new


def epoch(timestamp: Timestamp) -> float:
    """A protobuf Timestamp as seconds since the epoch (as ``time.time``)."""
    return float(timestamp.seconds + timestamp.nanos / 1e9)


# --- what tests look for and look with ----------------------------------------------


def forms(value: str) -> list[bytes]:
    """The ways a value could appear on disk, in a log or a metric: raw, UTF-8,
    escaped, base64 (as in a Basic header or a JWT)."""
    raw = value.encode()
    return [
        raw,
        value.encode("unicode_escape"),
        quote(value).encode(),
        quote_plus(value).encode(),
        repr(value).encode(),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
    ]


def decode_part(part: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


def header_and_claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, payload, _ = token.split(".")
    return decode_part(header), decode_part(payload)


class Bearer(httpx2.Auth):
    """The smallest useful ``httpx2.Auth``: one fixed bearer token on every request."""

    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


async def whoami(mcp: ProtectedMCPServer, token: str) -> dict[str, Any]:
    """Calls the whoami tool with the official MCP SDK client, carrying ``token``."""
    async with (
        httpx2.AsyncClient(auth=Bearer(token)) as http,
        Client(streamable_http_client(mcp.url, http_client=http), mode="legacy") as client,
    ):
        result = await client.call_tool("whoami", {})
    assert not result.is_error and result.structured_content is not None
    return dict(result.structured_content)
