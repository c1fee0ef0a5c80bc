"""TestServer: does this registration work, now? Each step reported.

Discovery (when the registration needs it), one token request (the token is
neither stored nor shown), and optionally the MCP server's ``initialize`` and
``tools/list`` with that token, through the official MCP SDK client. Every
step is bounded in time; what is reported never holds a secret or a token.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tokensvc.discovery import Discovery, complete, discover, needs_discovery
from tokensvc.egress import Egress, Response
from tokensvc.errors import FetchError, InvalidArgument
from tokensvc.fallbacks import Fetch
from tokensvc.registration import Credential, ServerSpec
from tokensvc.token import Token


@dataclass
class Step:
    name: str
    ok: bool = False
    detail: str = ""
    seconds: float = 0.0
    reason: str = ""
    error: str = ""
    http_status: int = 0
    tool_count: int = 0


@asynccontextmanager
async def _timed(step: Step) -> AsyncIterator[Step]:
    started = time.monotonic()
    try:
        yield step
    finally:
        step.seconds = time.monotonic() - started


async def probe(
    spec: ServerSpec,
    credential: Credential,
    discovery: Discovery | None,
    *,
    fetch: Fetch,
    egress: Egress,
    call_mcp: bool,
) -> list[Step]:
    steps: list[Step] = []
    if needs_discovery(spec) and discovery is None:
        step = Step("discovery")
        steps.append(step)
        async with _timed(step):
            try:
                discovery = await discover(spec, egress.get, egress.policy)
            except InvalidArgument as exc:
                step.detail, step.reason = exc.message, exc.reason
                return steps
            step.ok = True
            step.detail = (
                f"token endpoint {discovery.token_endpoint} (from {discovery.metadata_url})"
            )
    effective = complete(spec, credential.kind, discovery)
    step = Step("token_request")
    steps.append(step)
    token: Token | None = None
    async with _timed(step):
        try:
            token = await fetch(effective, credential)
        except FetchError as exc:
            step.detail, step.reason = exc.message, exc.reason
            step.error, step.http_status = exc.oauth.error, exc.oauth.status_code
            return steps
        step.ok = True
        step.detail = (
            f"{token.token_type} token via {effective.auth_method.value}, "
            f"valid {int(token.lifetime.total_seconds())} s"
        )
    if call_mcp:
        steps += await _call_mcp(spec.mcp_url, token, egress)
    return steps


async def _call_mcp(url: str, token: Token, egress: Egress) -> list[Step]:
    initialize, list_tools = Step("mcp_initialize"), Step("mcp_list_tools")
    try:
        egress.policy.check_syntax("server.mcp_url", url)
    except InvalidArgument as exc:
        initialize.detail, initialize.reason = exc.message, exc.reason
        return [initialize]
    statuses: list[int] = []

    async def remember(response: Response) -> None:
        statuses.append(response.status_code)

    headers = {"Authorization": f"{token.token_type} {token.access_token}"}
    async with (
        egress.client(headers=headers, event_hooks={"response": [remember]}) as http,
        _timed(initialize),
    ):
        try:
            client = Client(streamable_http_client(url, http_client=http), mode="legacy")
            async with client:
                initialize.ok = True
                initialize.detail = "initialized"
                initialize.http_status = statuses[-1] if statuses else 0
                async with _timed(list_tools):
                    tools = await client.list_tools()
                    list_tools.ok = True
                    list_tools.tool_count = len(tools.tools)
                    list_tools.detail = f"{len(tools.tools)} tools"
        except BaseException as exc:  # the SDK wraps failures in exception groups
            if not isinstance(exc, Exception | BaseExceptionGroup):
                raise
            failed = list_tools if initialize.ok else initialize
            failed.http_status = next((s for s in statuses if s >= 400), 0)
            failed.reason = "MCP_CALL_FAILED"
            if refused := _refusal(exc):
                failed.detail = f"not sent: {refused.message}"
                failed.reason = refused.reason
            elif failed.http_status:
                failed.detail = f"the MCP server answered HTTP {failed.http_status}"
            else:
                failed.detail = f"the MCP call failed ({type(exc).__name__})"
    return [initialize, list_tools] if initialize.ok else [initialize]


def _refusal(exc: BaseException) -> InvalidArgument | None:
    """The egress refusal inside what the SDK raised, if that is what it was."""
    if isinstance(exc, InvalidArgument):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if found := _refusal(inner):
                return found
    return _refusal(exc.__cause__) if exc.__cause__ is not None else None
