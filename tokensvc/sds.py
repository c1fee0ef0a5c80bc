"""Envoy SDS: tokensvc's tokens as Envoy generic secrets, by the xDS protocol.

A resource is named like the server id; its secret is the ``Authorization``
header value (``Bearer <token>``), or empty when the server has no valid token
(deleted, registration changed and no new token yet, expired during an outage,
never registered, or not one the caller may have): Envoy's credential injector
then refuses the request instead of sending a stale or foreign token.

The protocol state of one stream lives here, without gRPC (api/sds.py maps the
protos): which names the node asked for, what it was sent under which
``version_info`` and nonce, and what it ACKed or NACKed. A response goes out
only when what the node should hold differs from what it was last sent; a
request with an old nonce is ignored, as xDS says. :class:`Consumers` holds,
per server, each node's ACKed version and last NACK: every change of that
state goes through :meth:`Consumers._set`.

State of the world (StreamSecrets, FetchSecrets) and incremental (DeltaSecrets)
share the resource view (:class:`Secrets`) and the consumer bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from secrets import token_hex

from tokensvc import metrics
from tokensvc.errors import TokenSvcError, Unauthenticated
from tokensvc.events import Event, ServerRemoved, TokenIssued, TokenRevoked
from tokensvc.token import Clock, ServerToken, utcnow
from tokensvc.watch import CallerRevoked, Synced, Watch

log = logging.getLogger(__name__)

TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
EMPTY = "empty"  # the version of an empty secret


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    cluster: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """A DiscoveryRequest or DeltaDiscoveryRequest, as far as tokensvc reads it."""

    node: Node | None = None
    version_info: str = ""
    resource_names: tuple[str, ...] = ()  # SotW: the whole set; delta: subscribe
    unsubscribe: tuple[str, ...] = ()  # delta only
    initial_versions: dict[str, str] = field(default_factory=dict)  # delta only
    response_nonce: str = ""
    error: str = ""  # error_detail.message: a NACK

    @property
    def nack(self) -> bool:
        return bool(self.error)


@dataclass(frozen=True, slots=True)
class Resource:
    name: str
    token: ServerToken | None  # None: the empty secret

    @property
    def version(self) -> str:
        if self.token is None:
            return EMPTY
        # The revision too: a server registered again starts its versions over.
        return f"r{self.token.revision}v{self.token.version}"

    @property
    def header_value(self) -> str:
        """The ``Authorization`` header Envoy injects; empty: Envoy refuses."""
        return "" if self.token is None else f"Bearer {self.token.token.access_token}"


@dataclass(frozen=True, slots=True)
class Response:
    version_info: str
    nonce: str
    resources: tuple[Resource, ...]
    issued: tuple[ServerToken, ...] = ()  # token versions this node had not been sent


@dataclass(frozen=True, slots=True)
class Consumer:
    """One node's hold on one server's secret, for admins."""

    node: Node
    server_id: str
    acked_version: str = ""
    acked_at: datetime | None = None
    nack_error: str = ""
    nacked_at: datetime | None = None


def _state(consumer: Consumer | None) -> str | None:
    """acked or nacked, by the node's last word; None before it said anything."""
    if consumer is None:
        return None
    if consumer.nacked_at is not None and (
        consumer.acked_at is None or consumer.nacked_at >= consumer.acked_at
    ):
        return "nacked"
    return "acked" if consumer.acked_at is not None else None


class Consumers:
    """Every connected node's ACKed version and last NACK, per server."""

    def __init__(self, clock: Clock = utcnow, shared: bool = False) -> None:
        self._clock = clock
        self._held: dict[tuple[str, str], Consumer] = {}  # (server id, stream) -> consumer
        # Changed since taken, if shared (tokensvc.consumers tells the other replicas).
        self._shared = shared
        self._changed: dict[tuple[str, str], Consumer | None] = {}

    def _set(self, stream: str, consumer: Consumer | None, server_id: str) -> None:
        """The one place where ACK/NACK state changes."""
        key = (server_id, stream)
        previous = self._held.get(key)
        if consumer is None:
            if self._held.pop(key, None) is None:
                return
        else:
            self._held[key] = consumer
        metrics.sds_consumer(_state(previous), _state(consumer))
        if self._shared:
            self._changed[key] = consumer

    def take_changes(self) -> list[tuple[str, str, Consumer | None]]:
        """(stream, server id, consumer or None: gone) changed since the last take."""
        changes, self._changed = self._changed, {}
        return [(stream, server_id, c) for (server_id, stream), c in changes.items()]

    def give_back(self, changes: Iterable[tuple[str, str, Consumer | None]]) -> None:
        """Changes that could not be shared yet; newer ones win."""
        for stream, server_id, consumer in changes:
            self._changed.setdefault((server_id, stream), consumer)

    def _get(self, stream: str, node: Node, server_id: str) -> Consumer:
        return self._held.get((server_id, stream)) or Consumer(node, server_id)

    def acked(self, stream: str, node: Node, versions: Mapping[str, str]) -> None:
        """The node holds these versions (by its ACK, or its word on reconnecting)."""
        now = self._clock()
        for name, version in versions.items():
            held = self._get(stream, node, name)
            self._set(stream, replace(held, acked_version=version, acked_at=now), name)

    def nacked(self, stream: str, node: Node, names: Iterable[str], error: str) -> None:
        now = self._clock()
        for name in names:
            held = self._get(stream, node, name)
            self._set(stream, replace(held, nack_error=error, nacked_at=now), name)

    def drop(self, stream: str, names: Iterable[str]) -> None:
        for name in names:
            self._set(stream, None, name)

    def of(self, server_id: str) -> list[Consumer]:
        return sorted(
            (c for (sid, _), c in self._held.items() if sid == server_id),
            key=lambda c: (c.node.id, c.node.cluster),
        )


def versions(resources: Iterable[Resource]) -> dict[str, str]:
    return {r.name: r.version for r in resources}


class Secrets:
    """The valid tokens a stream's caller may have, kept current from a watch."""

    def __init__(self, allow: Callable[[str], bool], clock: Clock) -> None:
        self._allow = allow
        self.clock = clock
        self._tokens: dict[str, ServerToken] = {}
        self.synced = False
        self.revoked = False
        self._warned: set[str] = set()

    def apply(self, event: Event | Synced | CallerRevoked) -> None:
        match event:
            case Synced():
                self.synced = True
            case CallerRevoked():
                self.revoked = True  # every secret empty: the node stops using them
                self._tokens.clear()
            case TokenIssued(token=held):
                self._tokens[held.server_id] = held
            case TokenRevoked() | ServerRemoved():
                self._tokens.pop(event.server_id, None)  # fail closed until a new token

    def resource(self, name: str) -> Resource:
        held = self._tokens.get(name)
        if held is not None and held.token.expires_at > self.clock():
            return Resource(name, held)
        if name not in self._warned:
            self._warned.add(name)
            reason = (
                "the caller may not have it"
                if not self._allow(name)
                else "no valid token (not registered, changed, or expired)"
            )
            log.warning("SDS: serving an empty secret", extra={"resource": name, "why": reason})
        return Resource(name, None)

    def valid(self, name: str) -> None:
        self._warned.discard(name)

    def next_expiry(self, names: Iterable[str]) -> datetime | None:
        now = self.clock()
        times = [
            held.token.expires_at
            for name in names
            if (held := self._tokens.get(name)) is not None and held.token.expires_at > now
        ]
        return min(times, default=None)


def _redacted(error: str, resources: Iterable[Resource]) -> str:
    """A node's error message, with any token we sent it cut out (a node may quote
    what it rejected; the message is logged and shown to admins)."""
    for r in resources:
        if r.token is not None:
            error = error.replace(r.token.token.access_token, "[token]")
    return error


class _Stream:
    """What SotW and delta share: nonces, the node, and its consumer records."""

    def __init__(self, consumers: Consumers, secrets: Secrets) -> None:
        self.consumers = consumers
        self.secrets = secrets
        self.id = token_hex(8)
        self.node = Node("")
        self._nonces = itertools.count(1)
        self.sent: Response | None = None  # the last response
        self._sent_tokens: dict[str, tuple[int, int]] = {}  # (revision, version) per name

    def nonce(self) -> str:
        return f"{self.id}-{next(self._nonces)}"

    def _answer(self, request: Request) -> bool:
        """Records the node, and an ACK or NACK; False for a stale request."""
        if request.node is not None and request.node.id:
            self.node = request.node
        if not request.response_nonce:
            return True  # the first request of a stream
        if self.sent is None or request.response_nonce != self.sent.nonce:
            return False  # answers an older response: ignored
        if request.nack:
            error = _redacted(request.error, self.sent.resources)[:500]
            log.warning(
                "SDS: the node rejected secrets", extra={"node": self.node.id, "error": error}
            )
            names = [r.name for r in self.sent.resources]
            self.consumers.nacked(self.id, self.node, names, error)
        else:
            self.consumers.acked(self.id, self.node, versions(self.sent.resources))
        return True

    def _issued(self, resources: Iterable[Resource]) -> tuple[ServerToken, ...]:
        new = []
        for r in resources:
            if r.token is not None:
                key = (r.token.revision, r.token.version)
                if self._sent_tokens.get(r.name) != key:
                    self._sent_tokens[r.name] = key
                    new.append(r.token)
                self.secrets.valid(r.name)
        return tuple(new)

    def subscribed(self) -> Iterable[str]:
        raise NotImplementedError

    def close(self) -> None:
        """The stream ended: its node holds nothing of ours any more."""
        self.consumers.drop(self.id, self.subscribed())


class SotwStream(_Stream):
    """StreamSecrets: each response carries every requested resource."""

    def __init__(self, consumers: Consumers, secrets: Secrets) -> None:
        super().__init__(consumers, secrets)
        self.names: tuple[str, ...] | None = None  # None: no request yet
        self._holds = ""  # the version_info the node holds, by its request

    def request(self, request: Request) -> None:
        if not self._answer(request):
            return
        names = tuple(sorted(set(request.resource_names)))
        if self.names is not None:
            self.consumers.drop(self.id, set(self.names) - set(names))
        self.names = names
        if not request.response_nonce:
            self._holds = request.version_info  # a reconnecting node says what it has

    def view(self) -> tuple[str, tuple[Resource, ...]]:
        resources = tuple(self.secrets.resource(n) for n in self.names or ())
        return ",".join(r.version for r in resources), resources

    def response(self) -> Response | None:
        """What to send now, if anything."""
        if self.names is None or not self.secrets.synced:
            return None
        version, resources = self.view()
        last = self.sent.version_info if self.sent is not None else self._holds
        if version == last:
            if self.sent is None and last:  # reconnected, already current
                self.consumers.acked(self.id, self.node, versions(resources))
            return None
        self.sent = Response(version, self.nonce(), resources, issued=self._issued(resources))
        return self.sent

    def subscribed(self) -> Iterable[str]:
        return self.names or ()


class DeltaStream(_Stream):
    """DeltaSecrets: each response carries the resources that changed."""

    def __init__(self, consumers: Consumers, secrets: Secrets) -> None:
        super().__init__(consumers, secrets)
        self.names: set[str] = set()
        self._has: dict[str, str] = {}  # what the node holds, by what it was sent
        self._started = False

    def request(self, request: Request) -> None:
        if not self._answer(request):
            return
        self.names |= set(request.resource_names)
        if not request.response_nonce:
            self._has = dict(request.initial_versions)
            held = {n: v for n, v in self._has.items() if n in self.names}
            self.consumers.acked(self.id, self.node, held)  # a reconnecting node's word
        self._started = True
        for name in request.unsubscribe:
            self.names.discard(name)
            self._has.pop(name, None)
        self.consumers.drop(self.id, request.unsubscribe)

    def response(self) -> Response | None:
        if not self._started or not self.secrets.synced:
            return None
        resources = [self.secrets.resource(name) for name in sorted(self.names)]
        changed = tuple(r for r in resources if self._has.get(r.name) != r.version)
        if not changed:
            return None
        self._has.update((r.name, r.version) for r in changed)
        self.sent = Response("", self.nonce(), changed, self._issued(changed))
        return self.sent

    def subscribed(self) -> Iterable[str]:
        return self.names


async def serve(
    requests: AsyncIterator[Request], watch: Watch, stream: SotwStream | DeltaStream
) -> AsyncGenerator[Response, None]:
    """Runs one stream: reads the node's requests and the token changes, and
    gives each response to send. Ends when the node's requests end or the
    watch ends (shutdown: the node keeps what it has and reconnects). A revoked
    caller's node is sent empty secrets first, then the stream fails
    UNAUTHENTICATED."""
    Item = Request | Event | Synced | CallerRevoked | TokenSvcError | None
    inbox: asyncio.Queue[Item] = asyncio.Queue()

    async def pump(
        source: AsyncIterator[Request] | AsyncIterator[Event | Synced | CallerRevoked],
    ) -> None:
        try:
            async for item in source:
                inbox.put_nowait(item)
        except TokenSvcError as exc:  # a request that cannot be served: the stream fails
            inbox.put_nowait(exc)
        finally:
            inbox.put_nowait(None)

    async def changes() -> AsyncIterator[Event | Synced | CallerRevoked]:
        async for update in watch:
            yield update.event

    tasks = [asyncio.create_task(pump(requests)), asyncio.create_task(pump(changes()))]
    try:
        while True:
            expiry = stream.secrets.next_expiry(stream.subscribed())
            timeout = None
            if expiry is not None:
                timeout = max(0.01, (expiry - stream.secrets.clock()).total_seconds())
            try:
                item = await asyncio.wait_for(inbox.get(), timeout)
            except TimeoutError:
                pass  # a token expired: the secret becomes empty
            else:
                if item is None:
                    break
                if isinstance(item, TokenSvcError):
                    raise item
                if isinstance(item, Request):
                    stream.request(item)
                else:
                    stream.secrets.apply(item)
            if (response := stream.response()) is not None:
                yield response
            if stream.secrets.revoked:
                raise Unauthenticated("the caller was revoked: its secrets were emptied")
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        stream.close()


async def fetch(request: Request, watch: Watch, stream: SotwStream) -> Response:
    """FetchSecrets: the current resources, once."""
    async with contextlib.aclosing(watch.__aiter__()) as updates:
        async for update in updates:
            stream.secrets.apply(update.event)
            if isinstance(update.event, Synced):
                break
    stream.request(replace(request, version_info="", response_nonce=""))
    response = stream.response()
    stream.close()
    return response or Response("", stream.nonce(), ())
