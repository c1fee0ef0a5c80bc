"""Several ``tokensvc serve`` processes on one PostgreSQL database: one token
request per rotation for the whole fleet, changes that reach every replica's
watchers, a replica killed mid-request, a database restart, and the rule that
SQLite serves one replica.

Every replica is a real process (see replicas.py); the authorization server
runs in the test's event loop and tells which process asked (User-Agent).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.v1 import tokensvc_pb2 as pb

from replicas import (
    LISTENING,
    NOT_SERVING_STATUS,
    SERVING_STATUS,
    Cluster,
    HealthWatch,
    pid_of_user_agent,
    replica_cluster,
    run_tokensvc,
    start_replica,
    tokensvc_env,
)
from support import CLIENT_ID, PG_DSN, Seen, epoch, eventually, register, unavailable

# What the issue asks of a change reaching another replica's watcher is under a
# second; this leaves room for a busy two-core machine. The figure is printed.
PROPAGATION_BOUND = 1.5


def token_version(seen: Seen) -> int:
    return int(seen.event.token.version)


async def lock_waiters_are(cluster: Cluster, expected: list[bool]) -> bool:
    return await cluster.advisory_locks() == expected


async def test_600_concurrent_calls_on_3_replicas_for_a_cold_server_make_one_token_request(
    auth: AuthServer,
) -> None:
    gate = asyncio.Event()
    auth.behaviour.gate = gate  # the first token request is held until released
    async with replica_cluster(3) as cluster:
        replicas = cluster.replicas
        await register(replicas[0].admin, auth, "alpha")
        await asyncio.wait_for(auth.wait_for_requests(1), 30)

        request = pb.GetTokenRequest(server_id="alpha")
        calls = [r.tokens.GetToken(request, timeout=60) for r in replicas for _ in range(200)]
        # Sent: one more call on each replica's connection, started after the
        # 600. HTTP/2 delivers a connection's frames in order, so once the
        # replica answers it, it has read the 600 before it. (Nothing tells
        # when a call has reached the manager, and no pause could promise it;
        # the lock table below shows every replica waiting on the one fetch.)
        barrier = health_pb2.HealthCheckRequest()
        await asyncio.gather(*(r.health.Check(barrier, timeout=30) for r in replicas))
        # Every replica is waiting: one holds PostgreSQL's advisory lock of
        # "alpha" and fetches; the two others queue on it.
        await eventually(lambda: lock_waiters_are(cluster, [False, False, True]), within=30)
        assert not any(call.done() for call in calls)
        assert auth.token_requests == 1

        gate.set()
        tokens = await asyncio.wait_for(asyncio.gather(*calls), 60)

        assert auth.token_requests == 1
        assert {t.access_token for t in tokens} == {auth.issued[0]}
        assert {t.version for t in tokens} == {1}
        assert await cluster.advisory_locks() == []


async def test_replicas_make_about_one_token_request_per_rotation_not_one_each(
    auth: AuthServer,
) -> None:
    auth.behaviour = Behaviour(lifetime=3)  # a rotation every 1.5 s or so
    async with replica_cluster(3) as cluster:
        watchers = [r.watcher("alpha") for r in cluster.replicas]
        try:
            for watcher in watchers:
                await watcher.until("synced")
            await register(cluster.replicas[0].admin, auth, "alpha")
            watcher = watchers[2]
            first = await watcher.wait_for(lambda s: s.kind == "token")
            # ~10 s: six rotations after the first token, at ~1.5 s each.
            last = await watcher.wait_for(
                lambda s: s.kind == "token" and token_version(s) >= token_version(first) + 6,
                within=40,
            )
            requests = auth.token_requests
            elapsed = last.monotonic - first.monotonic
            seen = {token_version(s): s.event.token for s in watcher.tokens()}
            versions = sorted(seen)
            print(
                f"\n{len(versions)} versions in {elapsed:.1f} s, {requests} token requests "
                f"(replica 3's watcher)"
            )
            # Every rotation reached the watcher on replica 3, and there was
            # one token request per version, whichever replica made it.
            assert versions == list(range(1, versions[-1] + 1))
            assert requests <= len(versions) + 1  # + one in flight now
            # No version was fetched right after another by a second replica:
            # consecutive tokens are ~half a lifetime (1.5 s) apart.
            issued = [epoch(seen[v].issued_at) for v in versions]
            gaps = [b - a for a, b in itertools.pairwise(issued)]
            assert min(gaps) > 1.0, gaps
            # Every replica's watcher got the same token for each version.
            for other in watchers[:2]:
                theirs = {token_version(s): s.event.token.access_token for s in other.tokens()}
                assert len(theirs) >= len(versions) - 1
                assert all(theirs[v] == seen[v].access_token for v in theirs if v in seen)
        finally:
            for watcher in watchers:
                await watcher.close()


async def test_a_change_on_one_replica_reaches_a_watcher_on_another_within_a_second(
    auth: AuthServer,
) -> None:
    async with replica_cluster(3) as cluster:
        a, _, c = cluster.replicas
        await register(a.admin, auth, "alpha", scopes=["read"])
        watcher = c.watcher("alpha")
        try:
            await watcher.wait_for(lambda s: s.kind == "token")

            mark = len(watcher.seen)
            started = time.monotonic()
            await register(a.admin, auth, "alpha", scopes=["read", "write"])
            revoked = await watcher.wait_for(lambda s: s.kind == "revoked", after=mark)
            change_latency = revoked.monotonic - started
            assert revoked.event.revoked.revision == 2
            token = await watcher.wait_for(lambda s: s.kind == "token", after=mark)
            assert token.event.token.scopes == ["read", "write"]

            mark = len(watcher.seen)
            started = time.monotonic()
            await a.admin.DeleteServer(pb.DeleteServerRequest(id="alpha"), timeout=30)
            removed = await watcher.wait_for(lambda s: s.kind == "removed", after=mark)
            delete_latency = removed.monotonic - started
            assert removed.event.removed.server_id == "alpha"

            print(
                f"\nreplica 1 -> watcher on replica 3: change {change_latency * 1000:.0f} ms, "
                f"delete {delete_latency * 1000:.0f} ms"
            )
            assert change_latency < PROPAGATION_BOUND
            assert delete_latency < PROPAGATION_BOUND
        finally:
            await watcher.close()


async def test_when_the_fetching_replica_is_killed_another_serves_a_fresh_token_and_nothing_is_lost(
    auth: AuthServer,
) -> None:
    gate = asyncio.Event()
    auth.behaviour.gate = gate
    async with replica_cluster(3) as cluster:
        registered = await register(cluster.replicas[0].admin, auth, "alpha")
        await asyncio.wait_for(auth.wait_for_requests(1), 30)
        victim = cluster.by_pid(pid_of_user_agent(auth.last_headers["user-agent"]))
        survivors = [r for r in cluster.replicas if r is not victim]
        # Brokers ask the two others, which queue on the victim's advisory
        # lock of "alpha" (its owner's scheduled refresh does not wake them).
        calls = [asyncio.ensure_future(r.get_token("alpha", deadline=60)) for r in survivors]
        await eventually(lambda: lock_waiters_are(cluster, [False, False, True]), within=30)
        servers_before = (await cluster.fetch("SELECT count(*) AS n FROM servers"))[0]["n"]

        victim.kill()
        assert await asyncio.wait_for(victim.process.wait(), 10) == -signal.SIGKILL
        killed = time.monotonic()
        gate.set()
        tokens = await asyncio.wait_for(asyncio.gather(*calls), 15)
        print(f"\nfresh token from a survivor {time.monotonic() - killed:.2f} s after SIGKILL")

        # The victim's request was answered to nobody; one survivor asked again,
        # the other took what it stored.
        assert auth.token_requests == 2
        assert {t.access_token for t in tokens} == {auth.issued[1]}
        assert {t.version for t in tokens} == {1}
        # The victim's lock went with its connection; the survivors hold none now.
        await eventually(lambda: lock_waiters_are(cluster, []), within=10)
        assert (await cluster.fetch("SELECT count(*) AS n FROM servers"))[0]["n"] == servers_before
        server = await survivors[0].admin.GetServer(pb.GetServerRequest(id="alpha"), timeout=30)
        assert server.revision == registered.revision == 1
        assert server.credential_set and server.client_id == CLIENT_ID
        assert server.token_endpoint == auth.token_endpoint
        assert server.status.token_version == 1 and not server.status.HasField("last_error")
        # The stored token decrypts: a new replica serves it from the database.
        newcomer = await cluster.add()
        assert (await newcomer.get_token("alpha")).access_token == auth.issued[1]
        assert auth.token_requests == 2


def _cluster_version() -> str | None:
    if shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        return None
    versions = sorted(os.listdir("/etc/postgresql"))
    return versions[-1] if versions else None


def restartable_postgresql() -> str:
    """The version of the machine's PostgreSQL cluster (``ls /etc/postgresql``),
    for ``pg_ctlcluster``; skips (or fails, under TOKENSVC_TEST_REQUIRE_PG) when
    there is none to restart."""
    if urlsplit(PG_DSN).hostname not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip("TOKENSVC_TEST_PG is not this machine's PostgreSQL: cannot restart it")
    version = _cluster_version()
    if version is None:
        unavailable("PG", "restarting PostgreSQL needs pg_ctlcluster and /etc/postgresql")
    return version


@asynccontextmanager
async def postgresql_back(version: str) -> AsyncIterator[None]:
    """Whatever happens inside, PostgreSQL accepts connections afterwards: for
    the cleanup (dropping the test's database) and for the tests that follow."""
    try:
        yield
    finally:
        if not await pg_ready(wait=1):
            await pg_ctl(version, "start")
        assert await pg_ready(), "PostgreSQL did not come back"


async def pg_ctl(version: str, action: str, *options: str, stopped_already: bool = False) -> None:
    """``pg_ctlcluster``; with ``stopped_already``, a stop that finds the
    cluster stopped (by a shutdown under way) is no failure."""
    command = ("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *options)
    code, out = await _run(*command)
    done = stopped_already and "is not running" in out
    assert code == 0 or done, f"{' '.join(command)}: {out}"


async def pg_ready(wait: int = 60) -> bool:
    """Whether PostgreSQL accepts connections, waiting up to ``wait`` s for it."""
    code, _ = await _run("pg_isready", "-h", "127.0.0.1", "-p", "5432", "-t", str(wait))
    return code == 0


async def _run(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def test_replicas_ride_out_a_database_restart_and_catch_up_by_themselves(
    auth: AuthServer,
) -> None:
    """The restart is a stop, held until every replica reports NOT_SERVING, then
    a start: a plain ``pg_ctlcluster restart`` here refuses connections for only
    ~0.1 s (its 2 s are spent waiting for the new postmaster), which the
    health monitor, checking every 2 s, would see one time in twenty."""
    version = restartable_postgresql()
    auth.behaviour = Behaviour(lifetime=6)
    async with replica_cluster(2) as cluster, postgresql_back(version):
        await _restart_under_load(cluster, auth, version)


async def _restart_under_load(cluster: Cluster, auth: AuthServer, version: str) -> None:
    a, b = cluster.replicas
    await register(a.admin, auth, "alpha", scopes=["read"])
    watcher = b.watcher("alpha")
    healths = [HealthWatch(r) for r in cluster.replicas]
    answers: list[tuple[float, pb.Token]] = []
    failures: list[grpc.aio.AioRpcError] = []
    done = asyncio.Event()

    async def load() -> None:
        """Brokers asking each replica ten times a second."""
        while not done.is_set():
            for replica in cluster.replicas:
                try:
                    answers.append((time.time(), await replica.get_token("alpha", deadline=10)))
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)
            await asyncio.sleep(0.1)  # pacing, not waiting for anything

    loader = asyncio.create_task(load())
    try:
        for health in healths:
            assert await health.next() == SERVING_STATUS
        # Start the outage right after a rotation, with a whole lifetime ahead.
        first = await watcher.wait_for(lambda s: s.kind == "token")
        fresh = await watcher.wait_for(
            lambda s: s.kind == "token" and token_version(s) > token_version(first), within=30
        )
        held = fresh.event.token

        stopped = time.monotonic()
        await pg_ctl(version, "stop")
        for health in healths:
            assert await health.next(within=15) == NOT_SERVING_STATUS
        # The database is down: every replica still answers, from memory.
        for replica in cluster.replicas:
            token = await replica.get_token("alpha", deadline=10)
            assert token.version >= held.version
            assert epoch(token.expires_at) > time.time()
        await pg_ctl(version, "start")
        assert await pg_ready()
        for health in healths:
            assert await health.next(within=30) == SERVING_STATUS
        outage = time.monotonic() - stopped
        # Each replica's listener is back (a reconnection resyncs it).
        for replica in cluster.replicas:
            await replica.wait_for_log(LISTENING, count=2, within=30)

        # Rotations flow again: two more reach the watcher on replica 2.
        after = await watcher.wait_for(
            lambda s: s.kind == "token" and token_version(s) >= held.version + 2, within=30
        )
        # A change made on replica 1 reaches the watcher on replica 2.
        mark = len(watcher.seen)
        started = time.monotonic()
        await register(a.admin, auth, "alpha", scopes=["read", "write"])
        revoked = await watcher.wait_for(lambda s: s.kind == "revoked", after=mark)
        latency = revoked.monotonic - started
        renewed = await watcher.wait_for(lambda s: s.kind == "token", after=mark)
        assert renewed.event.token.scopes == ["read", "write"]
        print(
            f"\noutage {outage:.1f} s; versions {held.version} -> {token_version(after)}; "
            f"change after the restart reached replica 2 in {latency * 1000:.0f} ms"
        )
        assert latency < PROPAGATION_BOUND
    finally:
        done.set()
        await loader
        for health in healths:
            await health.close()
        await watcher.close()

    assert failures == []
    # Nobody was ever served an expired token...
    assert all(epoch(t.expires_at) > at for at, t in answers)
    # ... and the watcher always held a valid one: each token arrived before the
    # one it replaced expired (a revocation drops the held token on purpose).
    previous: pb.Token | None = None
    for seen in watcher.seen:
        if seen.kind == "revoked":
            previous = None
        elif seen.kind == "token":
            if previous is not None:
                left = epoch(previous.expires_at) - seen.wall
                assert left > 0, f"version {seen.event.token.version} came {-left:.2f} s late"
            previous = seen.event.token


async def test_after_an_outage_longer_than_the_token_lives_watchers_get_a_new_token_unasked(
    auth: AuthServer,
) -> None:
    version = restartable_postgresql()
    auth.behaviour = Behaviour(lifetime=3)
    async with replica_cluster(2) as cluster, postgresql_back(version):
        a, b = cluster.replicas
        watcher = b.watcher("alpha")
        health = HealthWatch(b)
        try:
            assert await health.next() == SERVING_STATUS
            await register(a.admin, auth, "alpha")
            held = (await watcher.wait_for(lambda s: s.kind == "token")).event.token
            await pg_ctl(version, "stop")
            assert await health.next(within=15) == NOT_SERVING_STATUS
            # Outlast the held token. Nothing announces that time has passed.
            await asyncio.sleep(max(0.0, epoch(held.expires_at) - time.time()) + 0.5)
            await pg_ctl(version, "start")
            assert await pg_ready()
            assert await health.next(within=30) == SERVING_STATUS
            mark = len(watcher.seen)
            # No broker calls GetToken: the watchers must be served all the same.
            fresh = await watcher.wait_for(lambda s: s.kind == "token", after=mark, within=10)
            assert fresh.event.token.version > held.version
        finally:
            await health.close()
            await watcher.close()


async def new_connections_are_refused_as_shutting_down() -> bool:
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
    except asyncpg.CannotConnectNowError:
        return True
    await conn.close()
    return False


async def test_health_goes_not_serving_while_postgresql_refuses_connections_as_shutting_down(
    auth: AuthServer,
) -> None:
    """A smart shutdown waits for the sessions still open (here one of the
    test's) and meanwhile refuses new connections with SQLSTATE 57P03, as
    every shutdown and start does for a moment. The replica's own sessions
    are ended, so that it must connect anew."""
    version = restartable_postgresql()
    async with replica_cluster(1) as cluster, postgresql_back(version):
        (replica,) = cluster.replicas
        health = HealthWatch(replica)
        holder = await asyncpg.connect(PG_DSN, timeout=10)
        stopping: asyncio.subprocess.Process | None = None
        try:
            assert await health.next() == SERVING_STATUS
            await register(replica.admin, auth, "alpha")
            await replica.get_token("alpha")
            stopping = await asyncio.create_subprocess_exec(
                "pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop", "-m", "smart"
            )
            await eventually(new_connections_are_refused_as_shutting_down, within=30)
            await holder.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                cluster.database,
            )
            # The health monitor checks every 2 s.
            assert await health.next(within=8) == NOT_SERVING_STATUS
        finally:
            await holder.close()
            if stopping is not None:
                # Finish the shutdown now, whoever else is connected (unless the
                # smart one, its last connection gone, has finished), and wait for it.
                if stopping.returncode is None:
                    await pg_ctl(version, "stop", "-m", "fast", stopped_already=True)
                await asyncio.wait_for(stopping.wait(), 60)
            await health.close()


async def test_replicas_with_the_same_hostname_and_pid_still_hear_each_other(
    auth: AuthServer,
) -> None:
    """Each replica in a PID namespace of its own, as in a container: both are
    PID 1 on the same host name."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare and root for PID namespaces")
    in_container = ("unshare", "--pid", "--fork", "--kill-child")
    async with replica_cluster(0) as cluster:
        a = await cluster.add(prefix=in_container)
        b = await cluster.add(prefix=in_container)
        assert a.replica_id.endswith(":1") and b.replica_id.endswith(":1")
        await register(a.admin, auth, "alpha", scopes=["read"])
        watcher = b.watcher("alpha")
        try:
            await watcher.until("synced")
            held = await b.get_token("alpha")  # b learns of "alpha" by being asked
            mark = len(watcher.seen)
            await register(a.admin, auth, "alpha", scopes=["read", "write"])
            await watcher.wait_for(lambda s: s.kind == "revoked", after=mark, within=5)
            assert (await b.get_token("alpha")).access_token != held.access_token
        finally:
            await watcher.close()


async def test_a_second_replica_on_the_same_sqlite_data_dir_is_refused_naming_postgresql(
    tmp_path: Path, auth: AuthServer
) -> None:
    env = tokensvc_env(data_dir=str(tmp_path / "data"), log_format="json", grace_period="2")
    first = await start_replica("sqlite-1", env, listening=False)
    try:
        code, out = await run_tokensvc("serve", "--listen", "127.0.0.1:0", env=env)
        assert code == 2, out
        assert "PostgreSQL" in out and "SQLite" in out, out
        assert f"pid {first.pid}" in out  # names who holds it
        assert "tokensvc serving" not in out

        # The first one never noticed.
        assert first.running
        check = await first.health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert check.status == SERVING_STATUS
        await register(first.admin, auth, "alpha")
        assert (await first.get_token("alpha")).access_token == auth.issued[0]
    finally:
        await first.close()
    assert first.process.returncode == 0
