"""``tokensvc demo``: the whole mission on loopback, in one process.

A local authorization server (authlib) issues short-lived JWTs; an MCP server
(official MCP SDK) accepts only valid ones for its own URL; tokensvc holds the
client credentials and rotates tokens; a demo broker calls a tool every
interval through ``TokenAuth``, printing each rotation as it happens, and a
tally at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc
import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tokensvc.client import BrokerToken, TokenAuth, TokenClient
from tokensvc.crypto import generate_key_entry
from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.server import Service
from tokensvc.settings import Settings
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

SERVER_ID = "demo-mcp"


@dataclass
class Tally:
    calls: int = 0
    failures: int = 0
    versions: list[int] = field(default_factory=list)
    done: bool = False

    def line(self, rejected: int, token_requests: int, retries: int) -> str:
        return (
            f"tally: calls={self.calls} failures={self.failures} 401s={rejected} "
            f"auth_retries={retries} token_requests={token_requests} "
            f"rotations_seen={max(len(self.versions) - 1, 0)}"
        )


async def run_demo(
    duration: float | None,
    lifetime: float = 10.0,
    interval: float = 1.0,
    out: TextIO = sys.stdout,
) -> int:
    """Runs until ``duration`` seconds pass (or forever); returns the exit code:
    0 only if no broker call failed."""

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    secret = secrets.token_urlsafe(24)
    async with contextlib.AsyncExitStack() as stack:
        auth = await stack.enter_async_context(AuthServer(behaviour=Behaviour(lifetime=lifetime)))
        auth.add_client("demo-broker", secret, scopes=("tools",))
        mcp = await stack.enter_async_context(
            ProtectedMCPServer(issuer=auth.issuer, jwks_uri=auth.jwks_uri)
        )
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tokensvc-demo-")))
        service = Service(
            Settings(listen="127.0.0.1:0", data_dir=data_dir, keys=generate_key_entry())
        )
        await service.start()
        stack.push_async_callback(service.stop, 1.0)
        target = f"127.0.0.1:{service.port}"
        say(f"authorization server  {auth.token_endpoint}  (JWTs live {lifetime:g} s)")
        say(f"MCP server            {mcp.url}")
        say(f"tokensvc              {target}")

        async with grpc.aio.insecure_channel(target) as channel:
            await pb_grpc.AdminServiceStub(channel).RegisterServer(
                pb.RegisterServerRequest(
                    server=pb.Server(
                        id=SERVER_ID,
                        mcp_url=mcp.url,
                        token_endpoint=auth.token_endpoint,
                        client_id="demo-broker",
                        scopes=["tools"],
                    ),
                    client_secret=secret,
                )
            )
        say(f"registered {SERVER_ID!r} with tokensvc; the broker starts calling")

        tally = Tally()

        def rotated(new: BrokerToken, previous: BrokerToken | None) -> None:
            if tally.done:
                return
            tally.versions.append(new.version)
            if previous is None:
                say(f"token v{new.version} received, valid {_left(new):.1f} s")
            else:
                say(
                    f"rotation: token v{new.version} pushed by tokensvc while "
                    f"v{previous.version} is still valid {_left(previous):.1f} s"
                )

        tokens = await stack.enter_async_context(TokenClient(target, [SERVER_ID], on_token=rotated))
        await tokens.wait_synced()
        token_auth = TokenAuth(tokens, SERVER_ID)
        http = await stack.enter_async_context(httpx2.AsyncClient(auth=token_auth))
        deadline = None if duration is None else time.monotonic() + duration
        session = await stack.enter_async_context(
            Client(streamable_http_client(mcp.url, http_client=http), mode="legacy")
        )
        tools = await session.list_tools()
        say(f"tools: {', '.join(t.name for t in tools.tools)}")
        # Ctrl-C (or SIGTERM) ends the demo like --duration does: with the tally.
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            started = time.monotonic()
            await _call(session, tokens, tally, say)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), max(0.0, interval - (time.monotonic() - started))
                )
        tally.done = True  # what arrives while everything shuts down is not news
        say(tally.line(mcp.rejected, auth.token_requests, token_auth.retries))
        return 0 if tally.failures == 0 and tally.calls > 0 else 1
    raise AssertionError("unreachable")


async def _call(
    session: Client, tokens: TokenClient, tally: Tally, say: Callable[[str], None]
) -> None:
    tally.calls += 1
    held = tokens.cached(SERVER_ID)
    try:
        result = await session.call_tool("whoami", {})
    except (MCPError, httpx2.HTTPError, grpc.aio.AioRpcError) as exc:
        tally.failures += 1
        say(f"call {tally.calls}: FAILED ({type(exc).__name__})")
        return
    if result.is_error:
        tally.failures += 1
        say(f"call {tally.calls}: FAILED (tool error)")
        return
    text = result.content[0].text if result.content else "{}"  # type: ignore[union-attr]
    try:
        jti = json.loads(text).get("jti", "?")
    except ValueError:
        jti = "?"
    version = held.version if held else "?"
    say(f"call {tally.calls}: ok, the MCP server accepted token v{version} (jti {jti})")


def _left(token: BrokerToken) -> float:
    return token.expires_at.timestamp() - time.time()
