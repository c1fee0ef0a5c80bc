"""The client side of the benchmarks. Each function runs in a process of its
own (``LoadProcess``), so that the load and the server under test do not share
an event loop or a GIL: on a two-core machine, one core each."""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from typing import Any, Self

import grpc
import httpx2

from tokensvc.v1 import tokensvc_pb2 as pb

# The bench's OAuth client, at its authorization server.
CLIENT_ID = "bench-client"
SECRET = "bench-secret"


def token_request() -> tuple[dict[str, str], str]:
    """The headers and body of the token request tokensvc sends for a bench server."""
    basic = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    body = "grant_type=client_credentials&resource=http%3A%2F%2F127.0.0.1%3A9%2Fmcp"
    headers = {
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    return headers, body


class LoadProcess:
    """A process of its own (spawn: gRPC does not survive fork) that runs load
    functions, one at a time; started once, so that many short runs do not
    each wait for an interpreter to start."""

    def __init__(self) -> None:
        self._pool = multiprocessing.get_context("spawn").Pool(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.terminate()
        self._pool.join()

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the process, and its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._pool.apply, function, args)


async def in_process_async(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a process started for it."""
    with LoadProcess() as process:
        return await process.run(function, *args)


Metadata = tuple[tuple[str, str], ...]


def unary(
    target: str,
    method: str,
    requests: list[bytes],
    seconds: float,
    concurrency: int,
    metadata: Metadata = (),
) -> tuple[int, list[float]]:
    """``concurrency`` callers calling ``method`` back to back for ``seconds``,
    cycling through ``requests`` (raw bytes), each call with ``metadata``.
    Returns (calls, latencies in s)."""
    return asyncio.run(_unary(target, method, requests, seconds, concurrency, metadata))


async def _unary(
    target: str,
    method: str,
    requests: list[bytes],
    seconds: float,
    concurrency: int,
    metadata: Metadata,
) -> tuple[int, list[float]]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: the same cost for both servers
        await call(requests[0], metadata=metadata)  # connected before the clock starts
        deadline = time.perf_counter() + seconds
        taken = iter(range(1, 1 << 62))

        async def caller() -> None:
            while time.perf_counter() < deadline:
                request = requests[next(taken) % len(requests)]
                started = time.perf_counter()
                await call(request, metadata=metadata)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return len(latencies), latencies


def fill(
    target: str,
    admin_target: str,
    registrations: list[bytes],
    concurrency: int,
    probe_every: float = 0.0,
    token_endpoint: str = "",
) -> tuple[float, list[tuple[float, float]]]:
    """Registers every server (``RegisterServer`` requests as bytes, to
    ``admin_target``), ``concurrency`` at a time, and watches (on ``target``)
    until each has its first token.

    With ``probe_every``, a broker meanwhile asks, that often, for the token of
    the newest server registered that has none yet (the one a queue would
    serve last) and, at the same moment, POSTs the same token request straight
    to ``token_endpoint``: what the authorization server alone takes then.
    Returns the seconds from the first registration to the last token, and
    each probe's two latencies in seconds (GetToken, bare POST)."""
    return asyncio.run(
        _fill(target, admin_target, registrations, concurrency, probe_every, token_endpoint)
    )


async def _fill(
    target: str,
    admin_target: str,
    registrations: list[bytes],
    concurrency: int,
    probe_every: float,
    token_endpoint: str,
) -> tuple[float, list[tuple[float, float]]]:
    waiting = {pb.RegisterServerRequest.FromString(r).server.id for r in registrations}
    registered: list[str] = []  # in the order their RegisterServer returned
    probes: list[tuple[float, float]] = []
    async with (
        grpc.aio.insecure_channel(target) as channel,
        grpc.aio.insecure_channel(admin_target) as admin,
        httpx2.AsyncClient(trust_env=False) as http,
    ):
        watch = channel.unary_stream("/tokensvc.v1.TokenService/WatchTokens")(
            pb.WatchTokensRequest().SerializeToString()
        )
        events = aiter(watch)
        while pb.TokenEvent.FromString(await anext(events)).WhichOneof("event") != "synced":
            pass
        register = admin.unary_unary("/tokensvc.v1.AdminService/RegisterServer")
        get_token = channel.unary_unary("/tokensvc.v1.TokenService/GetToken")
        headers, body = token_request()
        pending = iter(registrations)

        async def registering() -> None:
            for request in pending:
                await register(request)
                registered.append(pb.RegisterServerRequest.FromString(request).server.id)

        async def timed(call: Awaitable[Any]) -> float:
            started = time.perf_counter()
            await call
            return time.perf_counter() - started

        async def post() -> None:
            (await http.post(token_endpoint, content=body, headers=headers)).raise_for_status()

        async def probing() -> None:
            while waiting:
                newest = next((s for s in reversed(registered) if s in waiting), None)
                if newest is not None:
                    asked = pb.GetTokenRequest(server_id=newest).SerializeToString()
                    served, posted = await asyncio.gather(timed(get_token(asked)), timed(post()))
                    probes.append((served, posted))
                await asyncio.sleep(probe_every)  # the pace of a broker's calls

        started = time.perf_counter()
        workers = asyncio.gather(*(registering() for _ in range(concurrency)))
        prober = asyncio.ensure_future(probing() if probe_every else asyncio.sleep(0))
        try:
            async with asyncio.timeout(600):
                async for raw in events:
                    event = pb.TokenEvent.FromString(raw)
                    if event.WhichOneof("event") == "token":
                        waiting.discard(event.token.server_id)
                        if not waiting:
                            break
                elapsed = time.perf_counter() - started
                await workers
                await prober
        finally:
            watch.cancel()
            prober.cancel()
    return elapsed, probes


def watch(target: str, streams: int, versions: int, metadata: Metadata) -> Any:
    """Opens ``streams`` WatchTokens streams and reads each until ``versions``
    newer tokens have come after its ``synced``; returns every such token's
    delay from its ``issued_at`` to its arrival on the stream, in seconds."""
    return asyncio.run(_watch(target, streams, versions, metadata))


async def _watch(target: str, streams: int, versions: int, metadata: Metadata) -> list[float]:
    delays: list[float] = []
    channels = [grpc.aio.insecure_channel(target) for _ in range(max(1, streams // 100))]
    synced = 0
    all_synced = asyncio.Event()
    first: dict[int, int] = {}  # stream -> the version it had when synced

    async def stream(index: int) -> None:
        nonlocal synced
        channel = channels[index % len(channels)]
        call = channel.unary_stream("/tokensvc.v1.TokenService/WatchTokens")(
            pb.WatchTokensRequest().SerializeToString(), metadata=metadata or None
        )
        seen = 0
        async for raw in call:
            arrived = time.time_ns()
            event = pb.TokenEvent.FromString(raw)
            which = event.WhichOneof("event")
            if which == "synced":
                synced += 1
                first[index] = seen
                if synced == streams:
                    all_synced.set()
            elif which == "token":
                seen = event.token.version
                if all_synced.is_set() and seen > first[index]:
                    delays.append((arrived - event.token.issued_at.ToNanoseconds()) / 1e9)
                    if seen >= first[index] + versions:
                        call.cancel()
                        return

    tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 600)
    finally:
        for channel in channels:
            await channel.close()
    return delays
