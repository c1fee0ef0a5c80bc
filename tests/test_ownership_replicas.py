"""Refresh ownership across real replica processes on PostgreSQL: three
replicas split the scheduled refreshes (each server's token requests all come
from one replica), and when one is killed with SIGKILL the others take its
servers over before their tokens expire, with one request per rotation.

The authorization server counts token requests by client (one client per
server) and by the replica process that sent them (its User-Agent). Time is
real here: the bounds are generous, and every wait is on an event.
"""

from __future__ import annotations

import base64
import itertools
import signal
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from tokensvc.demo.authserver import AuthServer, Behaviour

from replicas import Cluster, Replica, pid_of_user_agent, replica_cluster
from support import SECRET, Seen, Watcher, epoch, register, sample, scrape

SERVERS = [f"srv-{i:02d}" for i in range(24)]
# Heartbeats every half second, gone after two: a takeover within 2.5 s.
FAST = {"replica_heartbeat_interval": "0.5", "replica_ttl": "2"}


class CountingAuthServer(AuthServer):
    """An authorization server that counts token requests by (client id,
    pid of the replica that sent it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.by: Counter[tuple[str, int]] = Counter()

    def build_app(self) -> ASGIApp:
        app = super().build_app()
        path = urlsplit(self.token_endpoint).path

        async def counting(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == path:
                headers = dict(scope["headers"])
                basic = headers.get(b"authorization", b"").decode().split(" ")[-1]
                client = unquote(base64.b64decode(basic).decode().split(":")[0])
                pid = pid_of_user_agent(headers.get(b"user-agent", b"").decode())
                self.by[(client, pid)] += 1
            await app(scope, receive, send)

        return counting

    def fetchers(self, client: str) -> set[int]:
        return {pid for (c, pid), n in self.by.items() if c == client and n}

    def requests_of(self, client: str) -> int:
        return sum(n for (c, _), n in self.by.items() if c == client)


async def counting_server(lifetime: float) -> AsyncIterator[CountingAuthServer]:
    async with CountingAuthServer(behaviour=Behaviour(lifetime=lifetime)) as server:
        for sid in SERVERS:
            server.add_client(sid, SECRET)
        yield server


@pytest.fixture
async def four_second() -> AsyncIterator[CountingAuthServer]:
    async for server in counting_server(4):
        yield server


@pytest.fixture
async def six_second() -> AsyncIterator[CountingAuthServer]:
    async for server in counting_server(6):
        yield server


async def all_see(replicas: list[Replica], live: int, since: dict[str, int] | None = None) -> None:
    """Until every replica has logged that it sees ``live`` replicas, in a
    "replicas changed" line after the ``since[name]`` it had logged before."""
    for replica in replicas:
        count = (since or {}).get(replica.name, 0) + 1
        while (await replica.wait_for_log("replicas changed", count=count))["live"] != live:
            count += 1


def version(seen: Seen) -> int:
    return int(seen.event.token.version)


async def registered_with_rotations(
    cluster: Cluster, auth: AuthServer, watcher: Watcher, rotations: int
) -> None:
    """Registers every server and waits until each has reached ``rotations``."""
    for sid in SERVERS:
        await register(cluster.replicas[0].admin, auth, sid, client_id=sid)
    for sid in SERVERS:
        await watcher.wait_for(
            lambda s, sid=sid: (
                s.kind == "token" and s.event.token.server_id == sid and version(s) >= rotations
            ),
            within=60,
        )


def tokens_of(watcher: Watcher, sid: str) -> list[Seen]:
    return [s for s in watcher.tokens() if s.event.token.server_id == sid]


async def test_three_replicas_split_the_refreshes_each_fetching_only_its_share(
    four_second: CountingAuthServer,
) -> None:
    auth = four_second
    settings = {**FAST, "metrics_listen": "127.0.0.1:0"}
    async with replica_cluster(3, **settings) as cluster:
        await all_see(cluster.replicas, 3)
        watcher = cluster.replicas[1].watcher()
        try:
            await watcher.until("synced")
            await registered_with_rotations(cluster, auth, watcher, 4)
        finally:
            await watcher.close()
        shares = Counter()
        for sid in SERVERS:
            fetchers = auth.fetchers(sid)
            assert len(fetchers) == 1, (sid, auth.by)  # its owner, and nobody else
            shares[fetchers.pop()] += 1
        print(f"\nservers refreshed by each replica: {sorted(shares.values())}")
        assert set(shares) == {r.pid for r in cluster.replicas}
        owned = []
        for replica in cluster.replicas:
            port = int((await replica.wait_for_log("tokensvc serving"))["metrics_port"])
            text = await scrape(port)
            assert sample(text, "tokensvc_replicas_live") == 3
            owned.append(sample(text, "tokensvc_servers_owned"))
        assert sum(owned) == len(SERVERS)
        assert sorted(owned) == sorted(shares.values())


async def test_when_a_replica_is_killed_its_servers_are_taken_over_before_their_tokens_expire(
    six_second: CountingAuthServer,
) -> None:
    auth = six_second
    async with replica_cluster(3, **FAST) as cluster:
        await all_see(cluster.replicas, 3)
        survivor = cluster.replicas[0]
        watcher = survivor.watcher()
        try:
            await watcher.until("synced")
            await registered_with_rotations(cluster, auth, watcher, 2)
            victim = cluster.replicas[2]
            orphans = [sid for sid in SERVERS if auth.fetchers(sid) == {victim.pid}]
            assert orphans
            reached = {sid: version(tokens_of(watcher, sid)[-1]) for sid in orphans}

            since = {r.name: len(r.logged("replicas changed")) for r in cluster.replicas}
            victim.kill()
            assert await victim.process.wait() == -signal.SIGKILL
            await all_see(cluster.replicas[:2], 2, since)
            for sid in orphans:  # two rotations more, by the survivors
                await watcher.wait_for(
                    lambda s, sid=sid: (
                        s.kind == "token"
                        and s.event.token.server_id == sid
                        and version(s) >= reached[sid] + 2
                    ),
                    within=60,
                )
        finally:
            await watcher.close()
        survivors = {r.pid for r in cluster.replicas[:2]}
        for sid in orphans:
            seen = tokens_of(watcher, sid)
            versions = [version(s) for s in seen]
            assert versions == sorted(set(versions)), versions
            # No gap: each token arrived before the one it replaced expired.
            for old, new in itertools.pairwise(seen):
                assert new.wall < epoch(old.event.token.expires_at), (sid, versions)
            # One request per version (and one in flight), whoever made it.
            assert auth.requests_of(sid) <= versions[-1] + 1, (sid, auth.by)
            assert auth.fetchers(sid) - {victim.pid} <= survivors
            assert auth.fetchers(sid) - {victim.pid}, sid  # a survivor took it over
