"""Cache-hit GetToken throughput and latency over real gRPC on loopback.

    .venv/bin/python tests/bench/get_token.py [--seconds 5] [--concurrency 64] [--metrics]

Prints figures; asserts nothing. One tokensvc (SQLite) and an in-process
authorization server; every call after the first is served from memory. The
client runs in its own process, so that the two do not share one event loop.
``--metrics`` serves /metrics, which times every call (the RPC interceptor).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokensvc.demo.authserver import AuthServer
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

from support import CLIENT_ID, SECRET, running_service


async def load(target: str, seconds: float, concurrency: int) -> tuple[int, list[float]]:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TokenServiceStub(channel)
        request = pb.GetTokenRequest(server_id="bench")
        await stub.GetToken(request)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                await stub.GetToken(request)
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), latencies


def client(target: str, seconds: float, concurrency: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    out.put(asyncio.run(load(target, seconds, concurrency)))


async def main(seconds: float, concurrency: int, metrics: bool) -> None:
    async with AuthServer() as auth:
        auth.add_client(CLIENT_ID, SECRET)
        with tempfile.TemporaryDirectory() as data:
            extra = {"metrics_listen": "127.0.0.1:0"} if metrics else {}
            async with running_service(Path(data), auth, **extra) as service:
                await service.register("bench")
                spawn = multiprocessing.get_context("spawn")  # gRPC does not survive fork
                results = spawn.Queue()
                process = spawn.Process(
                    target=client,
                    args=(service.target, seconds, concurrency, results),
                )
                cpu = time.process_time()  # this process: tokensvc (the client is another)
                process.start()
                count, latencies = await asyncio.get_running_loop().run_in_executor(
                    None,
                    results.get,
                )
                cpu = time.process_time() - cpu
                process.join()
                requests = auth.token_requests
    latencies.sort()
    print(
        f"GetToken, served from memory, {concurrency} concurrent callers, {seconds:g} s, "
        f"metrics {'on' if metrics else 'off'}"
    )
    print(f"  calls/s     {count / seconds:8.0f}")
    print(f"  p50 ms      {statistics.median(latencies) * 1000:8.2f}")
    print(f"  p99 ms      {latencies[int(len(latencies) * 0.99)] * 1000:8.2f}")
    print(f"  server CPU µs per call {cpu / count * 1e6:8.0f}")
    print(f"  token requests to the authorization server: {requests}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--metrics", action="store_true", help="serve /metrics (time every call)")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.concurrency, args.metrics))
