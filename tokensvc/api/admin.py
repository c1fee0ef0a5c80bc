"""AdminService: what admins and controllers call. Secrets go in, never out."""

from __future__ import annotations

import base64
import binascii

from google.protobuf.empty_pb2 import Empty

from tokensvc.api.convert import (
    audit_to_proto,
    caller_to_proto,
    credential_from_proto,
    moment,
    server_to_proto,
    spec_from_proto,
    step_to_proto,
)
from tokensvc.api.errors import Context, handles_errors
from tokensvc.auth import Authenticator, Role
from tokensvc.consumers import ConsumerRegistry
from tokensvc.errors import InvalidArgument
from tokensvc.registry import Callers, Registry
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


class AdminServicer(pb_grpc.AdminServiceServicer):
    """Proto mapping and authorization over the use cases of tokensvc.registry."""

    def __init__(
        self,
        registry: Registry,
        callers: Callers,
        auth: Authenticator,
        consumers: ConsumerRegistry,
    ) -> None:
        self._registry = registry
        self._callers = callers
        self._auth = auth
        self._consumers = consumers

    @handles_errors
    async def RegisterServer(
        self, request: pb.RegisterServerRequest, context: Context
    ) -> pb.Server:
        caller = await self._auth.require(context, Role.ADMIN)
        if not request.HasField("server"):
            raise InvalidArgument("server", "is required: the server to register")
        record = await self._registry.register(
            spec_from_proto(request.server),
            credential_from_proto(request),
            actor=caller.actor,
            expected_revision=request.expected_revision,
            keep_previous=request.keep_previous_credential,
            drop_previous=request.drop_previous_credential,
        )
        return server_to_proto(record)

    @handles_errors
    async def TestServer(
        self, request: pb.TestServerRequest, context: Context
    ) -> pb.TestServerResponse:
        caller = await self._auth.require(context, Role.ADMIN)
        target = request.WhichOneof("target")
        if target == "id":
            steps = await self._registry.test_stored(
                request.id, actor=caller.actor, call_mcp=request.call_mcp
            )
        elif target == "registration":
            steps = await self._registry.test_given(
                spec_from_proto(request.registration.server),
                credential_from_proto(request.registration),
                actor=caller.actor,
                call_mcp=request.call_mcp,
            )
        else:
            raise InvalidArgument("id", "give the id of a stored server, or a registration")
        ok = all(step.ok for step in steps)
        return pb.TestServerResponse(ok=ok, steps=[step_to_proto(step) for step in steps])

    @handles_errors
    async def GetServer(self, request: pb.GetServerRequest, context: Context) -> pb.Server:
        await self._auth.require(context, Role.ADMIN)
        record = await self._registry.get(request.id)
        consumers = await self._consumers.of([request.id])
        return server_to_proto(record, consumers[request.id])

    @handles_errors
    async def ListServers(
        self, request: pb.ListServersRequest, context: Context
    ) -> pb.ListServersResponse:
        await self._auth.require(context, Role.ADMIN)
        if request.page_size < 0:
            raise InvalidArgument(
                "page_size", f"must be 0 (default {DEFAULT_PAGE_SIZE}) or positive"
            )
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(request.page_token)
        records = await self._registry.page(after, size + 1)
        more = len(records) > size
        records = records[:size]
        next_token = _encode_page_token(records[-1].spec.id) if more else ""
        consumers = await self._consumers.of([r.spec.id for r in records])
        return pb.ListServersResponse(
            servers=[server_to_proto(r, consumers[r.spec.id]) for r in records],
            next_page_token=next_token,
        )

    @handles_errors
    async def DeleteServer(self, request: pb.DeleteServerRequest, context: Context) -> Empty:
        caller = await self._auth.require(context, Role.ADMIN)
        await self._registry.delete(request.id, actor=caller.actor)
        return Empty()

    # callers and the audit trail ---------------------------------------------

    @handles_errors
    async def CreateCaller(
        self, request: pb.CreateCallerRequest, context: Context
    ) -> pb.CreateCallerResponse:
        caller = await self._auth.require(context, Role.ADMIN)
        created, key = await self._callers.create(
            actor=caller.actor,
            name=request.name,
            roles=list(request.roles),
            patterns=list(request.server_patterns),
            certificate_identity=request.certificate_identity,
        )
        return pb.CreateCallerResponse(caller=caller_to_proto(created), key=key)

    @handles_errors
    async def ListCallers(
        self, request: pb.ListCallersRequest, context: Context
    ) -> pb.ListCallersResponse:
        await self._auth.require(context, Role.ADMIN)
        records = await self._callers.all()
        return pb.ListCallersResponse(callers=[caller_to_proto(r) for r in records])

    @handles_errors
    async def RevokeCaller(self, request: pb.RevokeCallerRequest, context: Context) -> pb.Caller:
        caller = await self._auth.require(context, Role.ADMIN)
        revoked = await self._callers.revoke(request.id, actor=caller.actor)
        return caller_to_proto(revoked)

    @handles_errors
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        await self._auth.require(context, Role.ADMIN)
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must be 0 (default 100) or positive")
        size = min(request.page_size or 100, 1000)
        after = _decode_page_token(request.page_token)
        if after and not (after.isascii() and after.isdigit() and len(after) <= 18):
            raise InvalidArgument("page_token", PAGE_TOKEN_FIX)
        events = await self._callers.audit_events(
            server_id=request.server_id,
            actor=request.actor,
            start=moment(request.start_time, "start_time")
            if request.HasField("start_time")
            else None,
            end=moment(request.end_time, "end_time") if request.HasField("end_time") else None,
            before_id=int(after or 0),
            limit=size + 1,
        )
        more = len(events) > size
        events = events[:size]
        return pb.ListAuditEventsResponse(
            events=[audit_to_proto(e) for e in events],
            next_page_token=_encode_page_token(str(events[-1].id)) if more else "",
        )


PAGE_TOKEN_FIX = "is not a token from this list: pass next_page_token back unchanged"


def _encode_page_token(last: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{last}".encode()).decode()


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith("v1:"):
        raise InvalidArgument("page_token", PAGE_TOKEN_FIX)
    return text[3:]
