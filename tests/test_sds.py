"""SecretDiscoveryService over real gRPC, with a stub playing Envoy: who may
ask, delta subscriptions, FetchSecrets, and the audit of what each node got.
(tests/test_envoy.py runs a real Envoy.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2 as xds
from envoy.service.secret.v3 import sds_pb2_grpc

from tokensvc.demo.authserver import AuthServer
from tokensvc.sds import TYPE_URL
from tokensvc.store import create_engine, migrate
from tokensvc.v1 import tokensvc_pb2 as pb

from support import (
    Harness,
    Metadata,
    bearer,
    create_pg_database,
    drop_pg_database,
    error_info,
    eventually,
    first_keys,
    running_service,
)

NODE = base_pb2.Node(id="gateway-1", cluster="gateway")


def header_values(response: Any) -> dict[str, str]:
    resources = [getattr(r, "resource", r) for r in response.resources]
    out = {}
    for packed in resources:
        secret = secret_pb2.Secret()
        assert packed.Unpack(secret)
        out[secret.name] = secret.generic_secret.secret.inline_string
    return out


class Stream:
    """A bidirectional SDS stream: requests written, responses read into a queue."""

    def __init__(self, method: Any, metadata: Metadata) -> None:
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.call = method(self._send(), metadata=metadata)
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._read())

    async def _send(self) -> AsyncIterator[Any]:
        while (request := await self.requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        async for response in self.call:
            self.responses.put_nowait(response)

    async def next(self) -> Any:
        async with asyncio.timeout(30):
            return await self.responses.get()

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def refusal(method: Any, metadata: Metadata) -> grpc.StatusCode:
    """The status of a stream refused on its caller's key alone. Nothing is
    written: a request written as the refusal arrives can make grpc.aio's client
    report INTERNAL instead of the server's status (grpc/grpc#36066)."""
    stream = Stream(method, metadata)
    await asyncio.gather(stream.task, return_exceptions=True)
    assert stream.responses.empty()
    await stream.requests.put(None)
    return await stream.call.code()


@pytest.fixture
async def keys(harness: Harness) -> dict[str, Metadata]:
    """An admin key and a broker key for team-a-* (open mode ends with the first)."""
    admin, team_a = await first_keys(harness.admin, "team-a-*", broker="envoy-a")
    return {"admin": bearer(admin), "team-a": bearer(team_a)}


async def register_all(harness: Harness, keys: dict[str, Metadata], *server_ids: str) -> None:
    """Registers the servers and has the team-a ones' first tokens fetched (GetToken)."""
    for server_id in server_ids:
        await harness.register(server_id, metadata=keys["admin"])
        if server_id.startswith("team-a-"):
            got = pb.GetTokenRequest(server_id=server_id)
            await harness.tokens.GetToken(got, metadata=keys["team-a"])


async def test_a_scoped_key_gets_its_servers_only_and_no_key_gets_nothing(
    harness: Harness, keys: dict[str, Metadata]
) -> None:
    await register_all(harness, keys, "team-a-x", "team-b-x")
    sds = sds_pb2_grpc.SecretDiscoveryServiceStub(harness.channel)
    stream = Stream(sds.StreamSecrets, keys["team-a"])
    names = ["team-a-x", "team-b-x"]
    await stream.requests.put(
        xds.DiscoveryRequest(node=NODE, resource_names=names, type_url=TYPE_URL)
    )
    first = await stream.next()
    values = header_values(first)
    assert values["team-a-x"].startswith("Bearer ey") and values["team-b-x"] == ""
    assert first.nonce and first.version_info.endswith(",empty")
    await stream.requests.put(
        xds.DiscoveryRequest(
            version_info=first.version_info,
            resource_names=names,
            response_nonce=first.nonce,
            type_url=TYPE_URL,
        )
    )
    # The ACK is recorded for admins, per server and node.
    assert harness.service.consumers is not None
    consumers = harness.service.consumers.local
    await eventually(lambda: bool(consumers.of("team-a-x")))
    [held] = consumers.of("team-a-x")
    assert (held.node.id, held.node.cluster) == ("gateway-1", "gateway")
    assert held.acked_version == first.version_info.split(",")[0]
    shown = await harness.admin.GetServer(
        pb.GetServerRequest(id="team-a-x"), metadata=keys["admin"]
    )
    [consumer] = shown.sds_consumers
    assert (consumer.node_id, consumer.cluster) == ("gateway-1", "gateway")
    assert consumer.acked_version == held.acked_version and consumer.HasField("acked_time")
    listed = await harness.admin.ListServers(pb.ListServersRequest(), metadata=keys["admin"])
    # team-b-x: the node asked, and holds the empty secret it was given.
    assert [[c.acked_version for c in s.sds_consumers] for s in listed.servers] == [
        [held.acked_version],
        ["empty"],
    ]
    await stream.close()
    await eventually(lambda: consumers.of("team-a-x") == [])  # gone with its stream

    for metadata in ((), (("authorization", "Bearer tsk_nope_nope"),)):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            fetched = sds.FetchSecrets(
                xds.DiscoveryRequest(node=NODE, resource_names=["team-a-x"]),
                metadata=metadata or None,
            )
            await fetched
        assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await refusal(sds.StreamSecrets, metadata)) == grpc.StatusCode.UNAUTHENTICATED

    # The audit trail names the node that got each token version.
    await harness.service.audit.flush()  # type: ignore[union-attr]
    events = await harness.admin.ListAuditEvents(
        pb.ListAuditEventsRequest(server_id="team-a-x"), metadata=keys["admin"]
    )
    issued = [json.loads(e.detail_json) for e in events.events if e.action == "issue"]
    assert {"via": "sds", "node": "gateway-1", "version": 1}.items() <= issued[0].items()
    none_b = await harness.admin.ListAuditEvents(
        pb.ListAuditEventsRequest(server_id="team-b-x"), metadata=keys["admin"]
    )
    assert not [e for e in none_b.events if e.action == "issue"]


async def test_fetch_secrets_answers_once_with_the_current_secret(
    harness: Harness, keys: dict[str, Metadata]
) -> None:
    await register_all(harness, keys, "team-a-x")
    sds = sds_pb2_grpc.SecretDiscoveryServiceStub(harness.channel)
    response = await sds.FetchSecrets(
        xds.DiscoveryRequest(node=NODE, resource_names=["team-a-x", "team-a-unknown"]),
        metadata=keys["team-a"],
    )
    values = header_values(response)
    assert values["team-a-x"].startswith("Bearer ") and values["team-a-unknown"] == ""
    assert response.version_info == "empty,r1v1"  # the names in order
    assert response.type_url == TYPE_URL
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await sds.FetchSecrets(
            xds.DiscoveryRequest(resource_names=["team-a-x"], type_url="type.googleapis.com/x"),
            metadata=keys["team-a"],
        )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "type_url" in (failed.value.details() or "")
    for names, field in (
        (["team-a-x", "../etc"], "resource_names[1]"),
        ([f"team-a-{i}" for i in range(1001)], "resource_names"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await sds.FetchSecrets(
                xds.DiscoveryRequest(resource_names=names), metadata=keys["team-a"]
            )
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(failed.value).metadata["field"] == field


async def test_a_stream_asking_for_a_name_that_is_no_server_id_fails_naming_it(
    harness: Harness, keys: dict[str, Metadata]
) -> None:
    sds = sds_pb2_grpc.SecretDiscoveryServiceStub(harness.channel)
    stream = Stream(sds.DeltaSecrets, keys["team-a"])
    await stream.requests.put(
        xds.DeltaDiscoveryRequest(node=NODE, resource_names_subscribe=["ok", "Bad Name"])
    )
    await asyncio.gather(stream.task, return_exceptions=True)
    assert (await stream.call.code()) == grpc.StatusCode.INVALID_ARGUMENT
    assert "resource_names_subscribe[1]" in (await stream.call.details())


async def test_delta_subscribe_unsubscribe_emptied_and_reconnect(
    harness: Harness, keys: dict[str, Metadata]
) -> None:
    await register_all(harness, keys, "team-a-x", "team-a-y")
    sds = sds_pb2_grpc.SecretDiscoveryServiceStub(harness.channel)
    delta = Stream(sds.DeltaSecrets, keys["team-a"])
    await delta.requests.put(
        xds.DeltaDiscoveryRequest(node=NODE, resource_names_subscribe=["team-a-x"])
    )
    first = await delta.next()
    assert [(r.name, r.version) for r in first.resources] == [("team-a-x", "r1v1")]
    await delta.requests.put(
        xds.DeltaDiscoveryRequest(response_nonce=first.nonce, resource_names_subscribe=["team-a-y"])
    )
    second = await delta.next()
    assert [r.name for r in second.resources] == ["team-a-y"]  # only what is new
    await delta.requests.put(
        xds.DeltaDiscoveryRequest(
            response_nonce=second.nonce, resource_names_unsubscribe=["team-a-y"]
        )
    )
    await harness.admin.DeleteServer(pb.DeleteServerRequest(id="team-a-y"), metadata=keys["admin"])
    await harness.admin.DeleteServer(pb.DeleteServerRequest(id="team-a-x"), metadata=keys["admin"])
    emptied = await delta.next()
    # team-a-y was unsubscribed: only team-a-x is emptied (never removed: Envoy
    # would keep injecting the old token).
    assert [(r.name, r.version) for r in emptied.resources] == [("team-a-x", "empty")]
    assert header_values(emptied) == {"team-a-x": ""} and not emptied.removed_resources
    await delta.close()

    await register_all(harness, keys, "team-a-x", "team-a-y")
    again = Stream(sds.DeltaSecrets, keys["team-a"])
    current = header_values(
        await sds.FetchSecrets(
            xds.DiscoveryRequest(resource_names=["team-a-x"]), metadata=keys["team-a"]
        )
    )
    assert current["team-a-x"]
    await again.requests.put(
        xds.DeltaDiscoveryRequest(
            node=NODE,
            resource_names_subscribe=["team-a-x", "team-a-y"],
            initial_resource_versions={"team-a-x": "r1v1"},  # already held
        )
    )
    resumed = await again.next()
    assert [r.name for r in resumed.resources] == ["team-a-y"]
    await again.close()


async def test_revoking_the_caller_empties_its_node_s_secrets_then_ends_the_stream(
    harness: Harness, keys: dict[str, Metadata]
) -> None:
    await register_all(harness, keys, "team-a-x")
    sds = sds_pb2_grpc.SecretDiscoveryServiceStub(harness.channel)
    stream = Stream(sds.StreamSecrets, keys["team-a"])
    await stream.requests.put(xds.DiscoveryRequest(node=NODE, resource_names=["team-a-x"]))
    first = await stream.next()
    assert header_values(first)["team-a-x"].startswith("Bearer ")
    callers = await harness.admin.ListCallers(pb.ListCallersRequest(), metadata=keys["admin"])
    [envoy_a] = [c for c in callers.callers if c.name == "envoy-a"]
    await harness.admin.RevokeCaller(pb.RevokeCallerRequest(id=envoy_a.id), metadata=keys["admin"])
    # Not the shutdown case (the node keeps what it has): the node must stop
    # using the token, so it gets an empty secret before the stream fails.
    emptied = await stream.next()
    assert header_values(emptied) == {"team-a-x": ""} and emptied.version_info == "empty"
    await asyncio.gather(stream.task, return_exceptions=True)
    assert (await stream.call.code()) == grpc.StatusCode.UNAUTHENTICATED


async def test_on_shutdown_the_stream_ends_without_emptying_anything(
    harness: Harness, keys: dict[str, Metadata]
) -> None:
    await register_all(harness, keys, "team-a-x")
    sds = sds_pb2_grpc.SecretDiscoveryServiceStub(harness.channel)
    stream = Stream(sds.StreamSecrets, keys["team-a"])
    await stream.requests.put(xds.DiscoveryRequest(node=NODE, resource_names=["team-a-x"]))
    await stream.next()
    await harness.service.stop(grace=1.0)
    await asyncio.gather(stream.task, return_exceptions=True)
    assert stream.responses.empty()  # no empty secret: Envoy keeps the token it has


async def test_every_replica_shows_the_nodes_connected_to_any_replica(
    tmp_path: Path, auth: AuthServer, key_entry: str
) -> None:
    url = await create_pg_database()
    engine = create_engine(url)
    try:
        await migrate.upgrade(engine)
        async with (
            running_service(tmp_path / "a", auth, database_url=url, keys=key_entry) as a,
            running_service(tmp_path / "b", auth, database_url=url, keys=key_entry) as b,
        ):
            created = await a.admin.CreateCaller(
                pb.CreateCallerRequest(name="admin", roles=["admin"])
            )
            admin = bearer(created.key)
            await register_all(a, {"admin": admin}, "weather")
            streams = sds_pb2_grpc.SecretDiscoveryServiceStub(a.channel).StreamSecrets
            # An admin key is no broker: the stream is refused.
            assert (await refusal(streams, admin)) == grpc.StatusCode.PERMISSION_DENIED
            broker = await a.admin.CreateCaller(
                pb.CreateCallerRequest(name="envoy", roles=["broker"]), metadata=admin
            )
            # The first token before the stream: one arriving after the first
            # response would be pushed, and the ACK below would then carry a
            # stale nonce, which xDS ignores.
            got = pb.GetTokenRequest(server_id="weather")
            await a.tokens.GetToken(got, metadata=bearer(broker.key))
            stream = Stream(streams, bearer(broker.key))
            await stream.requests.put(xds.DiscoveryRequest(node=NODE, resource_names=["weather"]))
            sent = await stream.next()
            assert sent.version_info != "empty"
            await stream.requests.put(
                xds.DiscoveryRequest(
                    version_info=sent.version_info,
                    resource_names=["weather"],
                    response_nonce=sent.nonce,
                )
            )

            async def shown_on_b() -> list[str]:
                server = await b.admin.GetServer(pb.GetServerRequest(id="weather"), metadata=admin)
                return [f"{c.node_id}/{c.cluster}@{c.acked_version}" for c in server.sds_consumers]

            async def acked_on_b() -> bool:
                return await shown_on_b() == [f"gateway-1/gateway@{sent.version_info}"]

            await eventually(acked_on_b)  # within a second or so: b reads it from the database
            await stream.close()

            async def gone_on_b() -> bool:
                return await shown_on_b() == []

            await eventually(gone_on_b)
    finally:
        await engine.dispose()
        await drop_pg_database(url)
