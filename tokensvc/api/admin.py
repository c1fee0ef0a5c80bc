"""AdminService: what admins and controllers call. Secrets go in, never out."""

from __future__ import annotations

import base64
import binascii
import logging

from google.protobuf.empty_pb2 import Empty

from tokensvc.api.convert import (
    credential_from_proto,
    server_to_proto,
    spec_from_proto,
    step_to_proto,
)
from tokensvc.api.errors import Context, handles_errors
from tokensvc.discovery import Getter, discover, needs_discovery
from tokensvc.errors import InvalidArgument
from tokensvc.manager import Fetch, TokenManager
from tokensvc.probe import probe
from tokensvc.registration import (
    UrlPolicy,
    validate_credential,
    validate_server_id,
    validate_spec,
)
from tokensvc.store import Store
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def actor_of(context: Context) -> str:
    return f"peer:{context.peer()}"


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        store: Store,
        manager: TokenManager,
        url_policy: UrlPolicy,
        get: Getter,
        fetch: Fetch,
    ) -> None:
        self._store = store
        self._manager = manager
        self._url_policy = url_policy
        self._get = get
        self._fetch = fetch

    @handles_errors
    async def RegisterServer(
        self, request: pb.RegisterServerRequest, context: Context
    ) -> pb.Server:
        if not request.HasField("server"):
            raise InvalidArgument("server", "is required: the server to register")
        spec = await validate_spec(spec_from_proto(request.server), self._url_policy)
        credential = credential_from_proto(request)
        if credential is not None:
            validate_credential(credential, spec)
        if request.expected_revision < -1:
            raise InvalidArgument("expected_revision", "must be -1, 0 or a revision number")
        found = None
        if needs_discovery(spec):
            found = await discover(spec, self._get, self._url_policy)
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
            spec, credential, request.expected_revision, actor_of(context), found, previous
        )
        if result.changed:
            self._manager.registered(result.record, result.revised)
            log.info(
                "server registered",
                extra={
                    "server_id": spec.id,
                    "revision": result.record.revision,
                    "actor": actor_of(context),
                },
            )
        return server_to_proto(result.record)

    @handles_errors
    async def TestServer(
        self, request: pb.TestServerRequest, context: Context
    ) -> pb.TestServerResponse:
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
            credential = validate_credential(given, spec)
            discovery = None
        else:
            raise InvalidArgument("id", "give the id of a stored server, or a registration")
        steps = await probe(
            spec,
            credential,
            discovery,
            fetch=self._fetch,
            get=self._get,
            policy=self._url_policy,
            call_mcp=request.call_mcp,
        )
        ok = all(step.ok for step in steps)
        await self._store.audit(
            actor_of(context), "test", spec.id, ok=ok, steps=[s.name for s in steps if s.ok]
        )
        return pb.TestServerResponse(ok=ok, steps=[step_to_proto(step) for step in steps])

    @handles_errors
    async def GetServer(self, request: pb.GetServerRequest, context: Context) -> pb.Server:
        validate_server_id(request.id)
        return server_to_proto(await self._store.get_server(request.id))

    @handles_errors
    async def ListServers(
        self, request: pb.ListServersRequest, context: Context
    ) -> pb.ListServersResponse:
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
        return pb.ListServersResponse(
            servers=[server_to_proto(r) for r in records], next_page_token=next_token
        )

    @handles_errors
    async def DeleteServer(self, request: pb.DeleteServerRequest, context: Context) -> Empty:
        validate_server_id(request.id)
        await self._store.delete(request.id, actor_of(context))
        self._manager.removed(request.id)
        log.info("server deleted", extra={"server_id": request.id, "actor": actor_of(context)})
        return Empty()


def _encode_page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode()


def _decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith("v1:"):
        raise InvalidArgument(
            "page_token", "is not a token from ListServers: pass next_page_token back unchanged"
        )
    return text[3:]
