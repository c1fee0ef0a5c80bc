"""Token requests: POSTs on kept-alive HTTP/1.1 connections, without httpx2's models.

A token request is a small form POST and its answer a small JSON body, sent
to few endpoints for many servers at once. Through httpx2's transport each
one built a Request and a Response model and their streams, and went through
a connection pool that scans its connections on each request and each close,
under anyio cancel scopes: more than half of a token request's CPU. Here a
connection is a pinned network stream (backend.py, stream.py) and an h11
state machine, and idle ones wait in a list per destination. What egress
promises holds for these requests as before: the URL policy on every address
connected to, a client certificate's connections its own (RFC 8705), trust
re-read when the CA file changes, the response size cap, identity encoding
only, the timeouts, no redirect followed.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import h11
import httpcore2
import httpx2

from tokensvc.client_cert import ClientCertificate
from tokensvc.egress.backend import PinnedBackend
from tokensvc.egress.limits import ResponseRefused, refusal
from tokensvc.egress.policy import UrlPolicy
from tokensvc.errors import InvalidArgument
from tokensvc.outbound_tls import OutboundTrust

# Connections open at once to one destination: the scheduler's concurrent
# token requests must not queue behind each other, nor open thousands.
MAX_CONNECTIONS = 100
# Destinations (scheme, host, port, client certificate) kept, the least
# recently used going first; a certificate's TLS context goes with its own.
MAX_DESTINATIONS = 64
# URLs kept parsed; past this many, all are forgotten (a fleet has few endpoints).
MAX_URLS = 1024
# An idle connection older than this is closed rather than reused: servers
# close idle keep-alives, and a request sent as they do fails (httpx2's default).
KEEPALIVE_EXPIRY = 5.0
READ_SIZE = 65536

Key = tuple[str, str, int, bytes]


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer, read in full (within the size cap); header names in lower
    case, a repeated header with its last value."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: bytes  # the request target: path and query
    authority: bytes  # the Host header


@dataclass(eq=False, slots=True)
class _Connection:
    stream: httpcore2.AsyncNetworkStream
    generation: int  # of the trust it was made with
    state: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    async def exchange(
        self, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes, limit: int, wait: float
    ) -> Answer:
        """One request and its answer; ``wait``: for each read and write."""
        state = self.state
        length = (b"Content-Length", str(len(body)).encode())
        request = state.send(h11.Request(method=b"POST", target=path, headers=[*headers, length]))
        request += state.send(h11.Data(data=body)) + state.send(h11.EndOfMessage())
        await self.stream.write(request, wait)
        status, answered, chunks, received = 0, {}, [], 0
        while True:
            event = state.next_event()
            if event is h11.NEED_DATA:
                state.receive_data(await self.stream.read(READ_SIZE, wait))
            elif isinstance(event, h11.Response):
                status = event.status_code
                answered = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                if why := refusal(answered, limit):
                    raise ResponseRefused(why, status)
            elif isinstance(event, h11.Data):
                received += len(event.data)
                if received > limit:
                    raise ResponseRefused(f"response larger than {limit} bytes", status)
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, answered, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise httpcore2.RemoteProtocolError("server disconnected without an answer")
            # An InformationalResponse (1xx): the answer follows.

    def next_cycle(self) -> bool:
        """Ready for the next request, unless either side ends the connection."""
        if self.state.our_state is h11.DONE and self.state.their_state is h11.DONE:
            self.state.start_next_cycle()
            return True
        return False

    def stale(self, now: float) -> bool:
        """Closed by its server while idle (an end, or anything, arrived), or idle too long."""
        readable = bool(self.stream.get_extra_info("is_readable"))
        return readable or now - self.idle_since > KEEPALIVE_EXPIRY


@dataclass(eq=False, slots=True)
class _Destination:
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONNECTIONS))
    idle: list[_Connection] = field(default_factory=list)
    retired: bool = False  # evicted: its connections close once their answer is read


class Poster:
    """POSTs to token endpoints, each answer read in full (see the module
    docstring); ``headers`` go on every request."""

    def __init__(
        self,
        policy: UrlPolicy,
        trust: OutboundTrust,
        network: httpcore2.AsyncNetworkBackend,
        headers: dict[str, str],
        *,
        timeout: float,
        max_response_bytes: int,
    ) -> None:
        self._backends = {s: PinnedBackend(policy, s, network) for s in ("http", "https")}
        self._trust = trust
        self._headers = [(name.encode(), value.encode()) for name, value in headers.items()]
        self._timeout = timeout
        self._limit = max_response_bytes
        self._targets: dict[str, _Target] = {}
        self._destinations: OrderedDict[Key, _Destination] = OrderedDict()
        self._contexts: dict[bytes, ssl.SSLContext] = {}
        self._generation = trust.generation
        self.open_connections = 0

    async def post(
        self,
        url: str,
        headers: dict[str, str],
        body: str,
        certificate: ClientCertificate | None = None,
    ) -> Answer:
        """``certificate``: presented in the TLS handshake (RFC 8705)."""
        target = self._target(url)
        if certificate is not None and target.scheme != "https":
            raise InvalidArgument("url", "must be https to present a client certificate")
        await self._follow_trust()
        digest = certificate.digest() if certificate is not None else b""
        destination = await self._destination((target.scheme, target.host, target.port, digest))
        context = self._context(target.scheme, certificate, digest)
        fields = [
            (b"Host", target.authority),
            *self._headers,
            *((name.encode(), value.encode()) for name, value in headers.items()),
        ]
        async with destination.slots:
            connection = await self._idle(destination) or await self._connect(target, context)
            try:
                answer = await connection.exchange(
                    target.path, fields, body.encode(), self._limit, self._timeout
                )
            except h11.ProtocolError as exc:
                await self._close(connection)
                # Its kind only: h11's message may quote what the server sent.
                raise httpcore2.RemoteProtocolError(type(exc).__name__) from None
            except BaseException:
                await self._close(connection)
                raise
            if (
                connection.next_cycle()
                and not destination.retired
                and connection.generation == self._generation
            ):
                connection.idle_since = time.monotonic()
                destination.idle.append(connection)
            else:
                await self._close(connection)
            return answer

    def _target(self, url: str) -> _Target:
        """The URL as httpx2 reads it (as the URL policy does), parsed once."""
        if (target := self._targets.get(url)) is None:
            parsed = httpx2.URL(url)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise InvalidArgument("url", "must be an absolute http(s) URL")
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            target = _Target(parsed.scheme, parsed.host, port, parsed.raw_path, parsed.netloc)
            if len(self._targets) >= MAX_URLS:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def _follow_trust(self) -> None:
        """Looks at the CA file; once it changed, no connection made with the
        old trust is used again (those in use close when their answer is read)."""
        self._trust.context()
        if self._trust.generation != self._generation:
            self._generation = self._trust.generation
            self._contexts.clear()
            for destination in self._destinations.values():
                await self._close_idle(destination)

    def _context(
        self, scheme: str, certificate: ClientCertificate | None, digest: bytes
    ) -> ssl.SSLContext | None:
        if scheme != "https":
            return None
        if certificate is None:
            return self._trust.context()
        if (context := self._contexts.get(digest)) is None:
            context = self._trust.client_context(certificate.chain_pem, certificate.key_pem)
            self._contexts[digest] = context
        return context

    async def _destination(self, key: Key) -> _Destination:
        if (destination := self._destinations.get(key)) is None:
            destination = self._destinations[key] = _Destination()
            while len(self._destinations) > MAX_DESTINATIONS:  # the least recently used go
                evicted_key, evicted = self._destinations.popitem(last=False)
                evicted.retired = True
                if not any(k[3] == evicted_key[3] for k in self._destinations):
                    self._contexts.pop(evicted_key[3], None)
                await self._close_idle(evicted)
        self._destinations.move_to_end(key)
        return destination

    async def _idle(self, destination: _Destination) -> _Connection | None:
        now = time.monotonic()
        while destination.idle:
            connection = destination.idle.pop()  # the most recently used: the likeliest alive
            if not connection.stale(now):
                return connection
            await self._close(connection)
        return None

    async def _connect(self, target: _Target, context: ssl.SSLContext | None) -> _Connection:
        stream = await self._backends[target.scheme].connect_tcp(
            target.host, target.port, self._timeout
        )
        self.open_connections += 1
        connection = _Connection(stream, self._generation)
        if context is not None:
            try:
                connection.stream = await stream.start_tls(context, target.host, self._timeout)
            except BaseException:
                await self._close(connection)
                raise
        return connection

    async def _close(self, connection: _Connection) -> None:
        self.open_connections -= 1
        await connection.stream.aclose()

    async def _close_idle(self, destination: _Destination) -> None:
        while destination.idle:
            await self._close(destination.idle.pop())

    async def aclose(self) -> None:
        for destination in self._destinations.values():
            destination.retired = True
            await self._close_idle(destination)
        self._destinations.clear()
