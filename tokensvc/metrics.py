"""Every Prometheus metric of tokensvc, and the one listener that serves them.

Names follow the OpenTelemetry semantic conventions where they exist, mapped
to Prometheus (dots become underscores, the unit a suffix): the RPC server
histogram is ``rpc.server.call.duration`` with ``rpc.system.name``,
``rpc.method`` and ``rpc.response.status_code``. Everything else is ours,
under ``tokensvc_``.

The rest of the service calls the small recording functions below, one line
per hook; it never touches a metric object. Labels carry server ids, method
names, status codes and reasons, never a secret or a token. Every value is
set by the event loop as things happen, so a scrape (on the listener's own
thread) only reads the metrics' own locked counters.

``configure(per_server=False)`` drops the ``server_id`` label for very large
fleets: the label is then empty, which Prometheus stores as no label at all,
and the expiry gauges show the server whose token expires first.
"""

from __future__ import annotations

import heapq
import platform
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from tokensvc import __version__
from tokensvc.errors import FetchError
from tokensvc.token import Token

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# The boundaries the conventions recommend for rpc.server.call.duration.
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
# A token request crosses the network to an authorization server (http_timeout: 10 s).
FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# How late a scheduled refresh starts: milliseconds when all is well.
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)

RPC_DURATION = Histogram(
    "rpc_server_call_duration_seconds",
    "Duration of incoming RPCs; for streams, from start to end of the stream.",
    ["rpc_system_name", "rpc_method", "rpc_response_status_code"],
    buckets=RPC_BUCKETS,
    registry=REGISTRY,
)
RPC_RESPONSES = Histogram(
    "rpc_server_responses_per_rpc",
    "Messages sent per server-streaming RPC.",
    ["rpc_system_name", "rpc_method"],
    buckets=(1, 2, 5, 10, 100, 1000, 10000),
    registry=REGISTRY,
)
TOKEN_REQUESTS = Counter(
    "tokensvc_token_requests",
    "Token requests to authorization servers, by result: ok or the error reason.",
    ["server_id", "result"],
    registry=REGISTRY,
)
TOKEN_REQUEST_DURATION = Histogram(
    "tokensvc_token_request_duration_seconds",
    "Duration of token requests to authorization servers, whatever their result.",
    ["server_id"],
    buckets=FETCH_BUCKETS,
    registry=REGISTRY,
)
TOKEN_EXPIRY = Gauge(
    "tokensvc_token_expiry_timestamp_seconds",
    "When the token served for the server expires (Unix time).",
    ["server_id"],
    registry=REGISTRY,
)
TOKEN_ISSUED = Gauge(
    "tokensvc_token_issued_timestamp_seconds",
    "When the token served for the server was issued (Unix time).",
    ["server_id"],
    registry=REGISTRY,
)
ROTATIONS = Counter(
    "tokensvc_token_rotations",
    "New tokens this replica started serving (fetched here or by another replica).",
    ["server_id"],
    registry=REGISTRY,
)
REFRESH_LAG = Histogram(
    "tokensvc_refresh_lag_seconds",
    "How late scheduled refreshes started against their schedule.",
    buckets=LAG_BUCKETS,
    registry=REGISTRY,
)
REJECTED_REPORTS = Counter(
    "tokensvc_rejected_token_reports",
    "GetToken calls that reported a token rejected by a resource server, by outcome: "
    "refreshed (it was the current token: a refresh was forced), stale (an older token: "
    "the current one was served), rate_limited (too many forced refreshes).",
    ["server_id", "outcome"],
    registry=REGISTRY,
)
WAITERS = Gauge(
    "tokensvc_single_flight_waiters",
    "Callers waiting for a token refresh in flight.",
    registry=REGISTRY,
)
WATCH_STREAMS = Gauge(
    "tokensvc_watch_streams",
    "Open WatchTokens streams.",
    registry=REGISTRY,
)
WATCH_EVENTS_SENT = Counter(
    "tokensvc_watch_events_sent",
    "Events sent on WatchTokens streams, by kind.",
    ["kind"],
    registry=REGISTRY,
)
WATCH_EVENTS_COALESCED = Counter(
    "tokensvc_watch_events_coalesced",
    "Events replaced by a newer one for the same server before a stream sent them.",
    registry=REGISTRY,
)
SDS_CONSUMERS = Gauge(
    "tokensvc_sds_consumers",
    "Envoy SDS streams, by the state of their last response: acked or nacked.",
    ["state"],
    registry=REGISTRY,
)
SDS_RESPONSES = Counter(
    "tokensvc_sds_responses_sent",
    "DiscoveryResponses sent to Envoy SDS consumers.",
    registry=REGISTRY,
)
REPLICAS_LIVE = Gauge(
    "tokensvc_replicas_live",
    "Replicas this one sees live (heartbeat within replica_ttl), itself included.",
    registry=REGISTRY,
)
SERVERS_OWNED = Gauge(
    "tokensvc_servers_owned",
    "Registered servers whose scheduled refresh belongs to this replica.",
    registry=REGISTRY,
)
DATABASE_UP = Gauge(
    "tokensvc_database_up",
    "1 while the database answers the health check, 0 while it does not.",
    registry=REGISTRY,
)
AUDIT_QUEUED = Gauge(
    "tokensvc_audit_records_queued",
    "Audit records waiting to be written.",
    registry=REGISTRY,
)
AUDIT_WRITTEN = Counter(
    "tokensvc_audit_records_written",
    "Audit records written to the database.",
    registry=REGISTRY,
)
AUDIT_DROPPED = Counter(
    "tokensvc_audit_records_dropped",
    "Audit records dropped because the queue was full.",
    registry=REGISTRY,
)
BUILD = Info("tokensvc_build", "The running tokensvc.", registry=REGISTRY)
BUILD.info({"version": __version__, "python": platform.python_version()})

_per_server = True
# Without the server label: each server's token times, to show the soonest;
# and the same times in a heap by expiry, where an entry whose server holds
# other times now is skipped when it comes to the top (a refresh costs
# O(log n), not a look at every server).
_held: dict[str, tuple[float, float]] = {}
_by_expiry: list[tuple[float, float, str]] = []


# Each labelled series once looked up: ``labels()`` checks and locks on every
# call, and a registration and its first token made eight of them.
_children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}


def configure(per_server: bool) -> None:
    global _per_server
    if per_server != _per_server:
        _held.clear()
        _by_expiry.clear()
        for gauge in (TOKEN_ISSUED, TOKEN_EXPIRY):
            _clear(gauge)
    _per_server = per_server


def _server(server_id: str) -> str:
    return server_id if _per_server else ""


def _child(metric: MetricWrapperBase, *values: str) -> Any:
    if (child := _children.get((metric, values))) is None:
        child = _children[metric, values] = metric.labels(*values)
    return child


def _remove(metric: MetricWrapperBase, *values: str) -> None:
    if _children.pop((metric, values), None) is not None:
        metric.remove(*values)


def _clear(metric: MetricWrapperBase) -> None:
    for key in [key for key in _children if key[0] is metric]:
        del _children[key]
    metric.clear()


# tokens -------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def timed_fetch(fetch: F) -> F:
    """Wraps a token fetch ``(spec, credential) -> Token``: counts each request
    by result and times it."""

    async def timed(spec: Any, *args: Any, **kwargs: Any) -> Any:
        server = _server(spec.id)
        started = time.perf_counter()
        result = "ok"
        try:
            return await fetch(spec, *args, **kwargs)
        except FetchError as exc:
            result = exc.reason.lower()
            raise
        except Exception:
            result = "internal_error"
            raise
        finally:
            _child(TOKEN_REQUEST_DURATION, server).observe(time.perf_counter() - started)
            _child(TOKEN_REQUESTS, server, result).inc()

    return timed  # type: ignore[return-value]


def token_held(server_id: str, token: Token) -> None:
    """The token now served for the server."""
    issued, expires = token.issued_at.timestamp(), token.expires_at.timestamp()
    if _per_server:
        _child(TOKEN_ISSUED, server_id).set(issued)
        _child(TOKEN_EXPIRY, server_id).set(expires)
        return
    _held[server_id] = (issued, expires)
    heapq.heappush(_by_expiry, (expires, issued, server_id))
    _show_soonest()


def token_rotated(server_id: str) -> None:
    _child(ROTATIONS, _server(server_id)).inc()


def server_forgotten(server_id: str) -> None:
    """The server's token is void (deleted, or registration changed)."""
    if not _per_server:
        if _held.pop(server_id, None) is not None:
            _show_soonest()
        return
    for gauge in (TOKEN_ISSUED, TOKEN_EXPIRY):
        _remove(gauge, server_id)


def _show_soonest() -> None:
    while _by_expiry and _held.get(_by_expiry[0][2]) != _by_expiry[0][1::-1]:
        heapq.heappop(_by_expiry)
    if not _by_expiry:
        _clear(TOKEN_ISSUED)
        _clear(TOKEN_EXPIRY)
        return
    expires, issued, _ = _by_expiry[0]
    _child(TOKEN_ISSUED, "").set(issued)
    _child(TOKEN_EXPIRY, "").set(expires)


def refresh_lag(seconds: float) -> None:
    REFRESH_LAG.observe(max(0.0, seconds))


def rejected_token_report(server_id: str, outcome: str) -> None:
    """outcome: refreshed, stale or rate_limited."""
    _child(REJECTED_REPORTS, _server(server_id), outcome).inc()


def waiter_joined() -> None:
    WAITERS.inc()


def waiter_left() -> None:
    WAITERS.dec()


# watch streams and SDS ----------------------------------------------------


def watch_stream_opened() -> None:
    WATCH_STREAMS.inc()


def watch_streams_closed(count: int = 1) -> None:
    WATCH_STREAMS.dec(count)


WATCH_EVENT_KINDS = ("TokenIssued", "FetchFailed", "TokenRevoked", "ServerRemoved", "Synced")


def watch_event_sent(kind: str) -> None:
    """kind: one of WATCH_EVENT_KINDS. Once per event and stream: the labelled
    counters are looked up once, not on every call."""
    _WATCH_EVENTS_SENT[kind].inc()


def watch_event_coalesced() -> None:
    WATCH_EVENTS_COALESCED.inc()


SDS_STATES = ("acked", "nacked")


def sds_consumer(previous: str | None, state: str | None) -> None:
    """An SDS stream moved from ``previous`` to ``state`` (None: not counted,
    i.e. before its first ACK or NACK, or closed)."""
    if previous == state:
        return
    if previous is not None:
        SDS_CONSUMERS.labels(previous).dec()
    if state is not None:
        SDS_CONSUMERS.labels(state).inc()


def sds_response_sent() -> None:
    SDS_RESPONSES.inc()


# database and audit -------------------------------------------------------


def ownership(live: int, owned: int) -> None:
    REPLICAS_LIVE.set(live)
    SERVERS_OWNED.set(owned)


def database_up(up: bool) -> None:
    DATABASE_UP.set(1 if up else 0)


def audit_queued(count: int) -> None:
    AUDIT_QUEUED.set(count)


def audit_written(count: int) -> None:
    AUDIT_WRITTEN.inc(count)


def audit_dropped(count: int = 1) -> None:
    AUDIT_DROPPED.inc(count)


for _state in SDS_STATES:
    SDS_CONSUMERS.labels(_state)
_WATCH_EVENTS_SENT = {kind: WATCH_EVENTS_SENT.labels(kind) for kind in WATCH_EVENT_KINDS}


# the listener -------------------------------------------------------------


class MetricsListener:
    """Prometheus text on ``/metrics`` of its own HTTP listener (a thread)."""

    def __init__(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        server, thread = start_http_server(int(port), host.strip("[]"), registry=REGISTRY)
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
