"""The container image, built from the Dockerfile and run with podman.

``make image-test`` readies the machine (tests/image/prepare: podman, runc,
debootstrap and a Debian base image, since no registry can be reached) and
runs this file. Where podman cannot run, it skips with the reason;
``TOKENSVC_TEST_REQUIRE_IMAGE=1`` (set by CI) makes that a failure. The
containers share the host's network so that they reach the test's
authorization server on loopback, and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokensvc.demo.authserver import AuthServer
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

from support import CLIENT_ID, SECRET, sample, scrape, unavailable

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = os.environ.get("TOKENSVC_BASE_IMAGE", "localhost/tokensvc-base:bookworm")
IMAGE = "localhost/tokensvc:test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "tests/image/containers.conf")}


def podman_sync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if shutil.which("podman") is None:
        unavailable("IMAGE", "podman is not installed here; `make image-test` installs it")
    if (info := podman_sync("info")).returncode != 0:
        unavailable("IMAGE", f"podman cannot run here: {info.stderr.strip()[-300:]}")
    if podman_sync("image", "exists", BASE_IMAGE).returncode != 0:
        unavailable(
            "IMAGE", f"no base image {BASE_IMAGE}: run tests/image/prepare (make image-test)"
        )
    trust = (
        ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "--build-arg", f"PIP_CERT={CA_BUNDLE}"]
        if CA_BUNDLE.is_file()
        else []
    )
    previous = podman_sync("image", "inspect", "--format={{.Id}}", IMAGE).stdout.strip()
    built = podman_sync(
        "build",
        "--format=docker",  # the OCI format drops HEALTHCHECK
        "--network=host",
        *trust,
        f"--build-arg=BASE_IMAGE={BASE_IMAGE}",
        f"--tag={IMAGE}",
        str(ROOT),
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    current = podman_sync("image", "inspect", "--format={{.Id}}", IMAGE).stdout.strip()
    if previous and previous != current:  # the last run's image, untagged now: not kept
        podman_sync("rmi", previous)
    yield IMAGE


async def podman(*args: str, check: bool = True) -> tuple[int, str, str]:
    """Exit code, stdout and stderr (where podman's notices go, and with run
    and logs the container's stderr: its log lines)."""
    process = await asyncio.create_subprocess_exec(
        "podman",
        *args,
        env=ENV,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    if check:
        assert process.returncode == 0, (args, err.decode()[-2000:])
    return process.returncode, out.decode(), err.decode()


def json_lines(output: str) -> list[dict[str, object]]:
    """tokensvc's log lines, without podman's own (``time=... level=...``)."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def free_port() -> int:
    """A port free now. The container binds it itself, with the host's network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def volume() -> AsyncIterator[str]:
    name = f"tokensvc-test-{secrets.token_hex(4)}"
    await podman("volume", "create", name)
    try:
        yield name
    finally:
        await podman("volume", "rm", "--force", name, check=False)


@asynccontextmanager
async def container(image: str, data: str, port: int, metrics_port: int) -> AsyncIterator[str]:
    name = f"tokensvc-test-{secrets.token_hex(4)}"
    await podman(
        "run",
        "--detach",
        f"--name={name}",
        "--network=host",
        f"--volume={data}:/data",
        f"--env=TOKENSVC_LISTEN=127.0.0.1:{port}",
        f"--env=TOKENSVC_METRICS_LISTEN=127.0.0.1:{metrics_port}",
        image,
    )
    try:
        yield name
    finally:
        await podman("rm", "--force", "--time=5", name, check=False)


async def serving(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=60
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def get_token(port: int, server_id: str) -> pb.Token:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await pb_grpc.TokenServiceStub(channel).GetToken(
            pb.GetTokenRequest(server_id=server_id), wait_for_ready=True, timeout=60
        )


async def test_the_image_serves_healthy_as_non_root_with_metrics_and_keeps_its_data(
    image: str, auth: AuthServer
) -> None:
    # Not the image's default port: the HEALTHCHECK must follow the setting.
    port, metrics_port = free_port(), free_port()
    async with volume() as data:
        async with container(image, data, port, metrics_port) as name:
            await serving(port)
            await podman("healthcheck", "run", name)
            _, state, _ = await podman(
                "inspect", "--format={{.State.Health.Status}} {{.Config.User}}", name
            )
            assert state.split()[-2:] == ["healthy", "10001:10001"]
            _, proc, _ = await podman("exec", name, "cat", "/proc/1/status")
            uids = next(line for line in proc.splitlines() if line.startswith("Uid:"))
            assert uids.split()[1:] == ["10001"] * 4

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await pb_grpc.AdminServiceStub(channel).RegisterServer(
                    pb.RegisterServerRequest(
                        server=pb.Server(
                            id="in-image",
                            mcp_url="http://127.0.0.1:9/mcp",
                            token_endpoint=auth.token_endpoint,
                            client_id=CLIENT_ID,
                        ),
                        client_secret=SECRET,
                    )
                )
            token = await get_token(port, "in-image")
            text = await scrape(metrics_port)
            assert sample(text, "tokensvc_token_expiry_timestamp_seconds", server_id="in-image")
            assert sample(text, "tokensvc_token_requests_total", result="ok") == 1

            await podman("restart", "--time=10", name)
            await serving(port)
            assert (await get_token(port, "in-image")).access_token == token.access_token
            _, _, logs = await podman("logs", name)
        # A new container on the same volume: same key file, same database.
        async with container(image, data, port, metrics_port):
            assert (await get_token(port, "in-image")).access_token == token.access_token
    assert auth.token_requests == 1  # the stored token was taken, never fetched again
    entries = json_lines(logs)
    assert any(e["msg"] == "tokensvc serving" and e["port"] == port for e in entries)
    assert SECRET not in logs and token.access_token not in logs


async def test_the_image_refuses_plaintext_off_loopback_in_json(image: str) -> None:
    code, _, err = await podman("run", "--rm", image, check=False)
    assert code == 2
    (entry,) = json_lines(err)
    assert entry["level"] == "error" and "no TLS is configured" in entry["msg"]
