"""Benchmark: three ``tokensvc serve`` replicas on one PostgreSQL database.

    python tests/bench/replicas.py [--calls 1000] [--lifetime 3] [--seconds 20]

1. A cold server: ``--calls`` concurrent GetToken spread over the replicas right
   after it is registered. Prints the token requests it took and the calls'
   latency.
2. ``--seconds`` of rotations of ``--lifetime`` s tokens with one WatchTokens
   stream on each replica. Prints token requests per rotation, which replica
   fetched, and how long a rotation takes to reach the watchers: each watcher's
   arrival of version v minus the first watcher's arrival of v (the fan-out
   through PostgreSQL), and minus the token's issued_at (the whole way, from
   the authorization server's answer).

It prints figures and asserts nothing. Not collected by pytest (no test_
prefix); it needs the PostgreSQL of the tests (TOKENSVC_TEST_PG).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

# The harness is tests/replicas.py (and support.py). It goes first on the path: this script's
# own directory (sys.path[0]) holds a module of the same name, this one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from starlette.types import ASGIApp, Receive, Scope, Send

from tokensvc.bench.measures import percentile
from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.v1 import tokensvc_pb2 as pb

from replicas import Cluster, pid_of_user_agent, replica_cluster
from support import CLIENT_ID, SECRET, Watcher, epoch, register


class RecordingAuthServer(AuthServer):
    """An AuthServer that also keeps the User-Agent of every token request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.user_agents: list[str] = []

    def build_app(self) -> ASGIApp:
        app = super().build_app()

        async def recording(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == "/token":
                headers = dict(scope["headers"])
                self.user_agents.append(headers.get(b"user-agent", b"").decode())
            await app(scope, receive, send)

        return recording


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f}"


async def cold_start(cluster: Cluster, auth: RecordingAuthServer, calls: int) -> None:
    replicas = cluster.replicas
    await register(replicas[0].admin, auth, "alpha")
    request = pb.GetTokenRequest(server_id="alpha")

    async def one(i: int) -> tuple[float, pb.Token | grpc.aio.AioRpcError]:
        started = time.perf_counter()
        try:
            token = await replicas[i % len(replicas)].tokens.GetToken(request, timeout=60)
        except grpc.aio.AioRpcError as exc:
            return time.perf_counter() - started, exc
        return time.perf_counter() - started, token

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(calls)))
    wall = time.perf_counter() - started
    requests = auth.token_requests
    latencies = [took for took, _ in results]
    tokens = [r for _, r in results if isinstance(r, pb.Token)]
    errors = Counter(r.code().name for _, r in results if isinstance(r, grpc.aio.AioRpcError))
    print(f"cold server: {calls} concurrent GetToken over {len(replicas)} replicas")
    print(f"  token requests      {requests}")
    print(f"  distinct tokens     {len({t.access_token for t in tokens})}")
    print(f"  errors              {dict(errors) or 0}")
    print(f"  wall                {wall:.2f} s")
    print(
        f"  call latency (ms)   p50 {ms(percentile(latencies, 0.5)).strip()}  "
        f"p99 {ms(percentile(latencies, 0.99)).strip()}  max {ms(max(latencies)).strip()}"
    )


async def rotations(
    cluster: Cluster, auth: RecordingAuthServer, watchers: list[Watcher], seconds: float
) -> None:
    names = {r.pid: r.name for r in cluster.replicas}
    first_watcher = watchers[0]
    start = await first_watcher.wait_for(lambda s: s.kind == "token")
    start_version = start.event.token.version
    requests_before = auth.token_requests
    agents_before = len(auth.user_agents)
    await asyncio.sleep(seconds)  # the measured window: rotations happen by themselves
    end = max(s.event.token.version for s in first_watcher.tokens())
    requests = auth.token_requests - requests_before
    fetched_by = Counter(
        names.get(pid_of_user_agent(ua), "?") for ua in auth.user_agents[agents_before:]
    )

    # Arrivals of each version, on each watcher (versions of the window only).
    window = range(start_version + 1, end + 1)
    arrivals: dict[int, dict[str, tuple[float, float]]] = {v: {} for v in window}
    issued: dict[int, float] = {}
    for watcher in watchers:
        for seen in watcher.tokens():
            version = seen.event.token.version
            if version in arrivals:
                arrivals[version][watcher.name] = (seen.monotonic, seen.wall)
                issued[version] = epoch(seen.event.token.issued_at)
    complete = [v for v in window if len(arrivals[v]) == len(watchers)]
    fan_out: dict[str, list[float]] = {w.name: [] for w in watchers}
    from_issue: dict[str, list[float]] = {w.name: [] for w in watchers}
    for version in complete:
        first = min(mono for mono, _ in arrivals[version].values())
        for name, (mono, wall) in arrivals[version].items():
            fan_out[name].append(mono - first)
            from_issue[name].append(wall - issued[version])

    rotated = end - start_version
    print()
    lifetime = auth.behaviour.lifetime
    print(f"rotations: {seconds:.0f} s of {lifetime:g} s tokens, a watcher per replica")
    print(f"  rotations           {rotated} (versions {start_version} -> {end})")
    print(f"  token requests      {requests}  ({requests / max(rotated, 1):.2f} per rotation)")
    print(f"  fetched by          {dict(sorted(fetched_by.items()))}")
    print(f"  versions on every watcher  {len(complete)} of {rotated}")
    print()
    print("  latency (ms)                    n      p50      p99      max")
    rows = [(f"fan-out  {name}", values) for name, values in fan_out.items()]
    rows.append(("fan-out  all, not first", [v for vs in fan_out.values() for v in vs if v > 0]))
    rows += [(f"issued -> {name}", values) for name, values in from_issue.items()]
    for label, values in rows:
        if values:
            print(
                f"  {label:<26} {len(values):>5}  {ms(percentile(values, 0.5))}  "
                f"{ms(percentile(values, 0.99))}  {ms(max(values))}"
            )
    print()
    print("  fan-out: arrival on a watcher minus the first watcher's arrival of that version")
    print("  issued:  arrival on a watcher minus the token's issued_at (wall clock, one host)")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--lifetime", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    auth = RecordingAuthServer(behaviour=Behaviour(lifetime=args.lifetime))
    async with auth, replica_cluster(args.replicas) as cluster:
        auth.add_client(CLIENT_ID, SECRET, scopes=("read", "write"))
        watchers = [r.watcher("alpha") for r in cluster.replicas]
        try:
            for watcher in watchers:
                await watcher.until("synced")
            await cold_start(cluster, auth, args.calls)
            await rotations(cluster, auth, watchers, args.seconds)
        finally:
            for watcher in watchers:
                await watcher.close()


if __name__ == "__main__":
    asyncio.run(main())
