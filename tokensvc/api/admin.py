"""AdminService: what admins and controllers call. Secrets go in, never out."""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from datetime import datetime

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
from tokensvc.assertions import AssertionDir
from tokensvc.auth import Authenticator, Role, check_patterns, key_hash, new_key, typed_identity
from tokensvc.consumers import ConsumerRegistry
from tokensvc.discovery import complete, discover, needs_discovery
from tokensvc.egress import Egress
from tokensvc.errors import InvalidArgument
from tokensvc.manager import Fetch, TokenManager
from tokensvc.probe import probe
from tokensvc.registration import (
    check_certificate_endpoint,
    validate_credential,
    validate_server_id,
    validate_spec,
)
from tokensvc.store import Store
from tokensvc.store.access import AccessStore, CallerRecord
from tokensvc.token import Clock, utcnow
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        store: Store,
        manager: TokenManager,
        egress: Egress,
        fetch: Fetch,
        auth: Authenticator,
        access: AccessStore,
        consumers: ConsumerRegistry,
        assertions: AssertionDir | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self._consumers = consumers
        self._assertions = assertions
        self._auth = auth
        self._access = access
        self._clock = clock
        self._store = store
        self._manager = manager
        self._egress = egress
        self._url_policy = egress.policy
        self._get = egress.get
        self._fetch = fetch

    @handles_errors
    async def RegisterServer(
        self, request: pb.RegisterServerRequest, context: Context
    ) -> pb.Server:
        caller = await self._auth.require(context, Role.ADMIN)
        if not request.HasField("server"):
            raise InvalidArgument("server", "is required: the server to register")
        spec = await validate_spec(spec_from_proto(request.server), self._url_policy)
        credential = credential_from_proto(request)
        if credential is not None:
            validate_credential(credential, spec, self._assertions)
        if request.expected_revision < -1:
            raise InvalidArgument("expected_revision", "must be -1, 0 or a revision number")
        found = None
        if needs_discovery(spec):
            found = await discover(spec, self._get, self._url_policy)
            if credential is not None:
                endpoint = complete(spec, credential.kind, found).token_endpoint
                where = "server.issuer" if spec.issuer else "server.mcp_url"
                check_certificate_endpoint(credential.kind, endpoint, where)
        if request.keep_previous_credential and request.drop_previous_credential:
            raise InvalidArgument(
                "keep_previous_credential", "cannot be set together with drop_previous_credential"
            )
        if request.keep_previous_credential and credential is None:
            raise InvalidArgument(
                "keep_previous_credential", "needs a new client_secret or private_key_pem"
            )
        previous = "keep" if request.keep_previous_credential else ""
        previous = "drop" if request.drop_previous_credential else previous
        result = await self._store.register(
            spec, credential, request.expected_revision, caller.actor, found, previous
        )
        if result.changed:
            self._manager.registered(result.record, result.revised)
            log.info(
                "server registered",
                extra={
                    "server_id": spec.id,
                    "revision": result.record.revision,
                    "actor": caller.actor,
                },
            )
        return server_to_proto(result.record)

    @handles_errors
    async def TestServer(
        self, request: pb.TestServerRequest, context: Context
    ) -> pb.TestServerResponse:
        caller = await self._auth.require(context, Role.ADMIN)
        target = request.WhichOneof("target")
        if target == "id":
            validate_server_id(request.id)
            loaded = await self._store.load_for_fetch(request.id)
            spec, credential = loaded.record.spec, loaded.credential
            discovery = loaded.record.discovery
        elif target == "registration":
            registration = request.registration
            spec = await validate_spec(
                spec_from_proto(registration.server), self._url_policy, "registration.server."
            )
            given = credential_from_proto(registration)
            if given is None:
                raise InvalidArgument(
                    "registration.client_secret", "is required: the credential to test"
                )
            credential = validate_credential(given, spec, self._assertions)
            discovery = None
        else:
            raise InvalidArgument("id", "give the id of a stored server, or a registration")
        steps = await probe(
            spec,
            credential,
            discovery,
            fetch=self._fetch,
            egress=self._egress,
            call_mcp=request.call_mcp,
        )
        ok = all(step.ok for step in steps)
        await self._store.audit(
            caller.actor, "test", spec.id, ok=ok, steps=[s.name for s in steps if s.ok]
        )
        return pb.TestServerResponse(ok=ok, steps=[step_to_proto(step) for step in steps])

    @handles_errors
    async def GetServer(self, request: pb.GetServerRequest, context: Context) -> pb.Server:
        await self._auth.require(context, Role.ADMIN)
        validate_server_id(request.id)
        record = await self._store.get_server(request.id)
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
        records = await self._store.list_servers(after, size + 1)
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
        validate_server_id(request.id)
        await self._store.delete(request.id, caller.actor)
        self._manager.removed(request.id)
        log.info("server deleted", extra={"server_id": request.id, "actor": caller.actor})
        return Empty()

    # callers and the audit trail ---------------------------------------------

    @handles_errors
    async def CreateCaller(
        self, request: pb.CreateCallerRequest, context: Context
    ) -> pb.CreateCallerResponse:
        caller = await self._auth.require(context, Role.ADMIN)
        created, key = await create_caller(
            self._access,
            name=request.name,
            roles=list(request.roles),
            patterns=list(request.server_patterns) or ["*"],
            certificate_identity=request.certificate_identity,
            now=self._clock(),
        )
        await self._auth.load()
        await self._store.announce("callers")
        await self._store.audit(
            caller.actor, "caller_create", None, caller_id=created.id, name=created.name
        )
        return pb.CreateCallerResponse(caller=caller_to_proto(created), key=key)

    @handles_errors
    async def ListCallers(
        self, request: pb.ListCallersRequest, context: Context
    ) -> pb.ListCallersResponse:
        await self._auth.require(context, Role.ADMIN)
        records = await self._access.list_callers()
        return pb.ListCallersResponse(callers=[caller_to_proto(r) for r in records])

    @handles_errors
    async def RevokeCaller(self, request: pb.RevokeCallerRequest, context: Context) -> pb.Caller:
        caller = await self._auth.require(context, Role.ADMIN)
        revoked = await self._access.revoke_caller(request.id, self._clock())
        if revoked is None:
            raise InvalidArgument("id", f"no caller with id {request.id[:40]!r}: see ListCallers")
        await self._auth.load()
        await self._store.announce("callers")
        self._manager.end_watches(revoked.id)
        await self._store.audit(
            caller.actor, "caller_revoke", None, caller_id=revoked.id, name=revoked.name
        )
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
        events = await self._access.list_audit(
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


async def create_caller(
    access: AccessStore,
    *,
    name: str,
    roles: list[str],
    patterns: list[str],
    certificate_identity: str,
    now: datetime,
) -> tuple[CallerRecord, str]:
    """Creates a caller; returns it and, for a key caller, its key (shown once)."""
    if not name or len(name) > 200 or any(ord(c) < 0x20 for c in name):
        raise InvalidArgument("name", "is required: 1 to 200 printable characters")
    known = {role.value for role in Role}
    if not roles or not set(roles) <= known:
        raise InvalidArgument("roles", f"give one or more of {', '.join(sorted(known))}")
    checked = check_patterns(patterns)
    if certificate_identity:
        certificate_identity = typed_identity(certificate_identity)
        caller_id, key, digest = secrets.token_hex(8), "", None
        kind = "certificate"
    else:
        caller_id, key = new_key()
        digest, kind = key_hash(key), "key"
    record = CallerRecord(
        id=caller_id,
        name=name,
        kind=kind,
        identity=certificate_identity,
        key_hash=digest,
        roles=tuple(sorted(set(roles))),
        server_patterns=checked,
        create_time=now,
        last_used_time=None,
        revoke_time=None,
    )
    await access.create_caller(record)
    return record, key
