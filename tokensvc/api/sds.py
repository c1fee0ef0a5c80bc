"""envoy.service.secret.v3.SecretDiscoveryService: what Envoy calls (tokensvc.sds
holds the protocol; this maps its protos and audits what each node got)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2 as xds
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from tokensvc import metrics, sds
from tokensvc.api.errors import Context, abort, handles_errors
from tokensvc.audit import AuditLog
from tokensvc.auth import Authenticator, Caller, Role
from tokensvc.errors import InvalidArgument, TokenSvcError
from tokensvc.manager import TokenManager
from tokensvc.registration import validate_server_id
from tokensvc.token import Clock, utcnow
from tokensvc.watch import MAX_WATCHED

Stream = sds.SotwStream | sds.DeltaStream
S = TypeVar("S", sds.SotwStream, sds.DeltaStream)


def _node(node: Any) -> sds.Node | None:
    return sds.Node(node.id, node.cluster) if node.id else None


def _check_type(type_url: str) -> None:
    if type_url and type_url != sds.TYPE_URL:
        raise InvalidArgument("type_url", f"tokensvc serves secrets only: {sds.TYPE_URL}")


def _names(names: Any, field: str) -> tuple[str, ...]:
    """Resource names are server ids; Envoy logs the error and retries."""
    if len(names) > MAX_WATCHED:
        raise InvalidArgument(field, f"ask for at most {MAX_WATCHED} secrets on one stream")
    return tuple(validate_server_id(name, f"{field}[{i}]") for i, name in enumerate(names))


def sotw_request(request: xds.DiscoveryRequest) -> sds.Request:
    _check_type(request.type_url)
    return sds.Request(
        node=_node(request.node),
        version_info=request.version_info,
        resource_names=_names(request.resource_names, "resource_names"),
        response_nonce=request.response_nonce,
        error=request.error_detail.message if request.HasField("error_detail") else "",
    )


def delta_request(request: xds.DeltaDiscoveryRequest) -> sds.Request:
    _check_type(request.type_url)
    return sds.Request(
        node=_node(request.node),
        resource_names=_names(request.resource_names_subscribe, "resource_names_subscribe"),
        unsubscribe=tuple(request.resource_names_unsubscribe),
        initial_versions=dict(request.initial_resource_versions),
        response_nonce=request.response_nonce,
        error=request.error_detail.message if request.HasField("error_detail") else "",
    )


def secret_any(resource: sds.Resource) -> any_pb2.Any:
    secret = secret_pb2.Secret(
        name=resource.name,
        generic_secret=secret_pb2.GenericSecret(
            secret=base_pb2.DataSource(inline_string=resource.header_value)
        ),
    )
    packed = any_pb2.Any()
    packed.Pack(secret)
    return packed


def sotw_response(response: sds.Response) -> xds.DiscoveryResponse:
    return xds.DiscoveryResponse(
        version_info=response.version_info,
        resources=[secret_any(r) for r in response.resources],
        type_url=sds.TYPE_URL,
        nonce=response.nonce,
    )


def delta_response(response: sds.Response) -> xds.DeltaDiscoveryResponse:
    return xds.DeltaDiscoveryResponse(
        resources=[
            xds.Resource(name=r.name, version=r.version, resource=secret_any(r))
            for r in response.resources
        ],
        type_url=sds.TYPE_URL,
        nonce=response.nonce,
    )


class SecretDiscoveryServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(
        self,
        manager: TokenManager,
        auth: Authenticator,
        audit: AuditLog,
        consumers: sds.Consumers,
        clock: Clock = utcnow,
    ) -> None:
        self._manager = manager
        self._auth = auth
        self._audit = audit
        self._consumers = consumers
        self._clock = clock

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[xds.DiscoveryRequest], context: Context
    ) -> AsyncIterator[xds.DiscoveryResponse]:
        caller, stream = await self._open(context, sds.SotwStream)
        requests = (sotw_request(r) async for r in request_iterator)
        async for response in self._serve(caller, stream, requests, context):
            yield sotw_response(response)

    async def DeltaSecrets(
        self, request_iterator: AsyncIterator[xds.DeltaDiscoveryRequest], context: Context
    ) -> AsyncIterator[xds.DeltaDiscoveryResponse]:
        caller, stream = await self._open(context, sds.DeltaStream)
        requests = (delta_request(r) async for r in request_iterator)
        async for response in self._serve(caller, stream, requests, context):
            yield delta_response(response)

    @handles_errors
    async def FetchSecrets(
        self, request: xds.DiscoveryRequest, context: Context
    ) -> xds.DiscoveryResponse:
        caller = await self._auth.require(context, Role.BROKER)
        stream = sds.SotwStream(self._consumers, sds.Secrets(caller.may_see, self._clock))
        watch = self._manager.watches.open(None, caller.may_see, caller.id)
        response = await sds.fetch(sotw_request(request), watch, stream)
        self._audit_issued(caller, stream, response)
        return sotw_response(response)

    async def _open(self, context: Context, kind: type[S]) -> tuple[Caller, S]:
        try:
            caller = await self._auth.require(context, Role.BROKER)
        except TokenSvcError as exc:
            await abort(context, exc)
        return caller, kind(self._consumers, sds.Secrets(caller.may_see, self._clock))

    async def _serve(
        self,
        caller: Caller,
        stream: Stream,
        requests: AsyncIterator[sds.Request],
        context: Context,
    ) -> AsyncIterator[sds.Response]:
        watch = self._manager.watches.open(None, caller.may_see, caller.id)
        try:
            async with contextlib.aclosing(sds.serve(requests, watch, stream)) as responses:
                async for response in responses:
                    self._audit_issued(caller, stream, response)
                    metrics.sds_response_sent()
                    yield response
        except TokenSvcError as exc:  # a request that cannot be read
            await abort(context, exc)

    def _audit_issued(self, caller: Caller, stream: Stream, response: sds.Response) -> None:
        for held in response.issued:
            self._audit.record(
                caller.actor,
                "issue",
                held.server_id,
                version=held.version,
                via="sds",
                node=stream.node.id,
            )
