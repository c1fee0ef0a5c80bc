"""Several ``tokensvc serve`` processes on one fresh PostgreSQL database.

The harness of ``test_replicas.py`` and ``bench/replicas.py``:

    async with replica_cluster(3) as cluster:
        a, b, c = cluster.replicas
        await register(a.admin, auth, "alpha")
        watcher = c.watcher("alpha")  # support's Watcher, on replica c
        token = await b.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))

(``register``, ``Watcher``, ``eventually`` and the ``auth`` fixture are the
in-process tests' own, from support.py: a replica is one more target for them.)

``replica_cluster`` creates a database, runs ``tokensvc migrate`` on it, starts
the replicas with one shared ``TOKENSVC_KEYS``, each on a port of its own
(``127.0.0.1:0``: the kernel picks a free port and the replica names it in its
"tokensvc serving" log line, so there is no window in which another process
could take it), and waits until each one serves and listens for the others'
changes. Each replica's stderr (JSON log lines) is collected by a background
task and can be awaited line by line. On exit the replicas are stopped
(SIGTERM, then SIGKILL) and the database is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokensvc.crypto import generate_key_entry
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

from support import Watcher, create_pg_database, drop_pg_database

TOKENSVC = str(Path(sys.executable).parent / "tokensvc")
SERVING = "tokensvc serving"
LISTENING = "listening for changes of other replicas"

SERVING_STATUS = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING_STATUS = health_pb2.HealthCheckResponse.NOT_SERVING


def tokensvc_env(**settings: str) -> dict[str, str]:
    """This environment without any TOKENSVC_* variable, plus ``settings``
    (``database_url="..."`` becomes ``TOKENSVC_DATABASE_URL``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENSVC_")}
    env.update({f"TOKENSVC_{name.upper()}": value for name, value in settings.items()})
    return env


async def run_tokensvc(*args: str, env: dict[str, str], within: float = 60) -> tuple[int, str]:
    """Runs a command that ends by itself; returns its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        TOKENSVC,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


def _parse(raw: str) -> dict[str, Any]:
    try:
        line = json.loads(raw)
    except ValueError:
        line = None
    if not isinstance(line, dict):
        line = {"msg": raw}  # a text line (errors before logging is configured)
    line["raw"] = raw
    return line


class Replica:
    """One ``tokensvc serve`` process: its log lines, channel and stubs."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.port = 0
        self.replica_id = ""
        self._changed = asyncio.Condition()
        self._eof = False
        self._reader = asyncio.create_task(self._read(), name=f"stderr:{name}")
        self.channel: grpc.aio.Channel | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while raw := await self.process.stderr.readline():
            async with self._changed:
                self.lines.append(_parse(raw.decode(errors="replace").rstrip("\n")))
                self._changed.notify_all()
        async with self._changed:
            self._eof = True
            self._changed.notify_all()

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if msg in line["msg"]]

    async def wait_for_log(self, msg: str, *, count: int = 1, within: float = 30) -> dict[str, Any]:
        """The ``count``-th log line whose message contains ``msg``, once it is
        written. Fails if the process ends first, or after ``within`` seconds."""

        def found() -> bool:
            return len(self.logged(msg)) >= count or self._eof

        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(found)
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: no {msg!r} (#{count}) within {within} s; log:\n{self.log_text()}"
            ) from None
        matches = self.logged(msg)
        if len(matches) < count:
            raise AssertionError(
                f"{self.name} ended (exit {await self.process.wait()}) before {msg!r}; "
                f"log:\n{self.log_text()}"
            )
        return matches[count - 1]

    def log_text(self, last: int = 40) -> str:
        return "\n".join(line["raw"] for line in self.lines[-last:])

    def connect(self) -> None:
        # A channel of its own: by default channels to one address share gRPC's
        # global subchannel pool (and a refused connection's backoff).
        self.channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.tokens = pb_grpc.TokenServiceStub(self.channel)
        self.admin = pb_grpc.AdminServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def watcher(self, *server_ids: str) -> Watcher:
        """A WatchTokens stream of this replica's, read in the background."""
        return Watcher(self.tokens, *server_ids, name=self.name)

    async def get_token(self, server_id: str, deadline: float = 30, **fields: Any) -> pb.Token:
        """GetToken with a deadline of ``deadline`` seconds."""
        request = pb.GetTokenRequest(server_id=server_id, **fields)
        token: pb.Token = await self.tokens.GetToken(request, timeout=deadline)
        return token

    def signal(self, number: int) -> None:
        """Signals the process group the replica leads (with a ``prefix``, the
        command that runs it and tokensvc itself)."""
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, number)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def stop(self, within: float = 30) -> int:
        """SIGTERM, and SIGKILL if it has not ended ``within`` seconds."""
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), within)
            except TimeoutError:
                self.kill()
        return await self.process.wait()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 10)


async def start_replica(
    name: str,
    env: dict[str, str],
    *,
    listen: str = "127.0.0.1:0",
    listening: bool = True,
    within: float = 60,
    prefix: Sequence[str] = (),
) -> Replica:
    """Starts ``tokensvc serve`` (behind ``prefix``, a command that runs it)
    and returns once it serves (and, with ``listening``, once it listens for
    the other replicas' changes)."""
    process = await asyncio.create_subprocess_exec(
        *prefix,
        TOKENSVC,
        "serve",
        "--listen",
        listen,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,  # a process group of its own, to signal
    )
    replica = Replica(name, process)
    try:
        ready = await replica.wait_for_log(SERVING, within=within)
        replica.port = int(ready["port"])
        replica.replica_id = str(ready.get("replica", ""))
        if listening:
            await replica.wait_for_log(LISTENING, within=within)
        replica.connect()
    except BaseException:
        await replica.close()
        raise
    return replica


def pid_of_user_agent(user_agent: str) -> int:
    """The pid in ``tokensvc/<version> (<hostname>:<pid>)``."""
    match = re.fullmatch(r"tokensvc/\S+ \((.+):(\d+)\)", user_agent)
    assert match, f"not a tokensvc User-Agent: {user_agent!r}"
    return int(match.group(2))


def asyncpg_url(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@dataclass
class Cluster:
    """Replicas sharing one database and one key."""

    database_url: str
    env: dict[str, str]
    replicas: list[Replica] = field(default_factory=list)
    # The replicas' data dirs (nothing in them on PostgreSQL with TOKENSVC_KEYS).
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tokensvc-replicas-")))

    @property
    def database(self) -> str:
        return self.database_url.rsplit("/", 1)[1]

    async def add(self, *, listening: bool = True, prefix: Sequence[str] = ()) -> Replica:
        """Starts one more replica (with a data dir of its own)."""
        name = f"replica-{len(self.replicas)}"
        env = {**self.env, "TOKENSVC_DATA_DIR": str(self.root / name)}
        replica = await start_replica(name, env, listening=listening, prefix=prefix)
        self.replicas.append(replica)
        return replica

    def by_pid(self, pid: int) -> Replica:
        (replica,) = [r for r in self.replicas if r.pid == pid]
        return replica

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Runs SQL on the cluster's database, on a connection of its own."""
        conn = await asyncpg.connect(asyncpg_url(self.database_url), timeout=10)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    async def advisory_locks(self) -> list[bool]:
        """``granted`` of each advisory lock held or awaited on this database."""
        rows = await self.fetch(
            "SELECT granted FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = $1)",
            self.database,
        )
        return sorted(row["granted"] for row in rows)

    def print_logs(self, last: int = 60) -> None:
        for replica in self.replicas:
            print(f"--- {replica.name} (pid {replica.pid}), last {last} log lines ---")
            print(replica.log_text(last))

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.replicas), return_exceptions=True)
        shutil.rmtree(self.root, ignore_errors=True)


@asynccontextmanager
async def replica_cluster(count: int, **settings: str) -> AsyncIterator[Cluster]:
    """``count`` replicas on a fresh, migrated database; ``settings`` become
    TOKENSVC_* variables of every replica."""
    url = await create_pg_database()
    try:
        settings = {"log_format": "json", "grace_period": "2", **settings}
        env = tokensvc_env(database_url=url, keys=generate_key_entry(), **settings)
        code, out = await run_tokensvc("migrate", env=env)
        assert code == 0, out
        cluster = Cluster(url, env)
        try:
            # One after the other: each start is CPU-bound (imports), and the
            # machine may have two cores.
            for _ in range(count):
                await cluster.add()
            yield cluster
        except BaseException:
            cluster.print_logs()  # pytest shows them with the failure
            raise
        finally:
            await cluster.close()
    finally:
        await drop_pg_database(url)


class HealthWatch:
    """A grpc.health.v1 Watch stream; statuses as they come, awaitable."""

    def __init__(self, replica: Replica, service: str = "") -> None:
        self.name = replica.name
        self.statuses: list[int] = []
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._call = replica.health.Watch(health_pb2.HealthCheckRequest(service=service))
        self._task = asyncio.create_task(self._read(), name=f"health:{replica.name}")

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self.statuses.append(response.status)
                self._queue.put_nowait(response.status)
        except grpc.aio.AioRpcError:
            pass
        finally:
            self._queue.put_nowait(None)

    async def next(self, within: float = 30) -> int | None:
        """The next status the server sends (None: the stream ended)."""
        try:
            return await asyncio.wait_for(self._queue.get(), within)
        except TimeoutError:
            names = [health_pb2.HealthCheckResponse.ServingStatus.Name(s) for s in self.statuses]
            raise AssertionError(
                f"health of {self.name}: no change within {within} s; so far {names}"
            ) from None

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
