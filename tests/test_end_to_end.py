"""The whole mission, in real time: an authorization server issuing 3-second
JWTs, an MCP server (official SDK) that checks them, tokensvc rotating them,
and a broker calling through TokenAuth. Bounds are generous: a busy machine
makes calls slower, never wrong."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tokensvc.client import BrokerToken, TokenAuth, TokenClient
from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.demo.mcpserver import ProtectedMCPServer

from replicas import TOKENSVC
from support import CLIENT_ID, SECRET, running_service


async def test_a_broker_on_the_stream_never_gets_a_401_across_many_rotations(
    tmp_path: Path,
) -> None:
    async with (
        AuthServer(behaviour=Behaviour(lifetime=3)) as auth,
        ProtectedMCPServer(issuer=auth.issuer, jwks_uri=auth.jwks_uri) as mcp,
        running_service(tmp_path, auth) as tokensvc,
    ):
        auth.add_client(CLIENT_ID, SECRET)
        await tokensvc.register("mcp", mcp_url=mcp.url)
        margins: list[float] = []  # how long the previous token still had when a new one came

        def arrived(new: BrokerToken, previous: BrokerToken | None) -> None:
            if previous is not None:
                margins.append(previous.expires_at.timestamp() - time.time())

        async with TokenClient(tokensvc.target, ["mcp"], on_token=arrived) as tokens:
            await asyncio.wait_for(tokens.wait_synced(), 30)
            token_auth = TokenAuth(tokens, "mcp")
            calls = failures = 0
            async with (
                httpx2.AsyncClient(auth=token_auth) as http,
                Client(streamable_http_client(mcp.url, http_client=http), mode="legacy") as session,
            ):
                deadline = time.monotonic() + 10  # about 6 rotations of 3-second tokens
                while time.monotonic() < deadline:
                    calls += 1
                    result = await session.call_tool("echo", {"text": f"call {calls}"})
                    failures += bool(result.is_error)
                    await asyncio.sleep(0.1)  # pacing of the broker, not a wait
        print(f"calls={calls} rotations={len(margins)} margins={[round(m, 2) for m in margins]}")
        assert failures == 0 and calls > 20
        assert mcp.rejected == 0 and token_auth.retries == 0
        assert len(margins) >= 3
        assert min(margins) > 0  # every rotation arrived before the previous token expired
        assert auth.token_requests <= len(margins) + 2  # one request per rotation


async def test_the_demo_runs_with_no_failed_call() -> None:
    process = await asyncio.create_subprocess_exec(
        TOKENSVC,
        "demo",
        "--duration",
        "6",
        "--lifetime",
        "2",
        "--interval",
        "0.3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(process.communicate(), 120))[0].decode()
    assert process.returncode == 0, out
    tally = re.search(r"tally: calls=(\d+) failures=(\d+) 401s=(\d+)", out)
    assert tally is not None, out
    calls, failures, rejected = map(int, tally.groups())
    assert calls >= 10 and failures == 0 and rejected == 0
    assert out.count("rotation: token v") >= 2
