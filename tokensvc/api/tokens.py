"""TokenService: what brokers call. Its responses are bytes, each token's
serialized once (tokensvc.api.wire)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.message import DecodeError

from tokensvc import metrics
from tokensvc.api.convert import duration, event_to_proto, synced
from tokensvc.api.errors import Context, abort, handles_errors
from tokensvc.api.repeats import Key, RepeatedCalls
from tokensvc.api.wire import TokenWire
from tokensvc.audit import AuditLog
from tokensvc.auth import Authenticator, Caller, Role
from tokensvc.errors import InvalidArgument, PermissionDenied, TokenSvcError, Unauthenticated
from tokensvc.events import TokenIssued
from tokensvc.manager import TokenManager
from tokensvc.registration import validate_server_id
from tokensvc.token import Clock
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc
from tokensvc.watch import MAX_WATCHED, CallerRevoked, Synced

HEX = frozenset("0123456789abcdefABCDEF")


def _visible(caller: Caller, server_id: str) -> None:
    if not caller.may_see(server_id):
        raise PermissionDenied(f"caller {caller.name!r} may not have tokens of {server_id!r}")


class TokenServicer(pb_grpc.TokenServiceServicer):
    def __init__(
        self, manager: TokenManager, auth: Authenticator, audit: AuditLog, clock: Clock
    ) -> None:
        self._manager = manager
        self._auth = auth
        self._audit = audit
        self._wire = TokenWire()
        self._repeats = RepeatedCalls(manager, auth, clock)

    async def GetToken(self, raw: bytes, context: Context) -> bytes:
        """``raw``: the request's bytes (see add_token_service). A call like
        one that succeeded before is answered as it was (RepeatedCalls)."""
        credential = self._auth.credential(context)
        key = None if credential is None else (*credential, raw)
        if key is not None:
            repeated = self._repeats.answer(key)
            if repeated is not None:
                return self._wire.token(repeated)
        return await self._get_token(raw, context, key)

    @handles_errors
    async def _get_token(self, raw: bytes, context: Context, key: Key | None) -> bytes:
        generation = self._auth.generation
        try:
            request = pb.GetTokenRequest.FromString(raw)
        except DecodeError:
            raise InvalidArgument("request", "is not a GetTokenRequest message") from None
        caller = await self._auth.require(context, Role.BROKER)
        validate_server_id(request.server_id, "server_id")
        _visible(caller, request.server_id)
        rejected = request.rejected_token_sha256
        if rejected and (len(rejected) != 64 or not HEX.issuperset(rejected)):
            raise InvalidArgument(
                "rejected_token_sha256", "must be the 64 hex digits of the token's SHA-256"
            )
        wanted = self._manager.min_valid_for
        if request.HasField("min_valid_for"):
            wanted = duration(request.min_valid_for, "min_valid_for", wanted)
        held = await self._manager.get_token(request.server_id, wanted, rejected)
        self._audit.issued(caller, held.server_id, held.version)
        if key is not None and not rejected:
            self._repeats.remember(key, generation, caller, held, wanted)
        return self._wire.token(held)  # pb.Token, serialized once per token

    async def WatchTokens(
        self, request: pb.WatchTokensRequest, context: Context
    ) -> AsyncIterator[bytes]:
        server_ids = list(dict.fromkeys(request.server_ids))
        try:
            caller = await self._auth.require(context, Role.BROKER)
            if len(server_ids) > MAX_WATCHED:
                raise InvalidArgument(
                    "server_ids", f"watch at most {MAX_WATCHED} ids (or none: all)"
                )
            for i, server_id in enumerate(server_ids):
                validate_server_id(server_id, f"server_ids[{i}]")
                _visible(caller, server_id)
        except TokenSvcError as exc:
            await abort(context, exc)
        async for update in self._manager.watches.open(server_ids, caller.may_see, caller.id):
            event = update.event
            if isinstance(event, CallerRevoked):
                # Ended because the caller was revoked: say so, unlike a shutdown.
                await abort(context, Unauthenticated(f"caller {caller.name!r} was revoked"))
            if isinstance(event, Synced):
                metrics.watch_event_sent("Synced")
                yield synced(update.sequence).SerializeToString()
                continue
            metrics.watch_event_sent(type(event).__name__)
            if isinstance(event, TokenIssued):
                self._issued(caller, event)
                yield self._wire.token_event(event.token, update.sequence)
            else:
                yield event_to_proto(event, update.sequence).SerializeToString()

    def _issued(self, caller: Caller, event: TokenIssued) -> None:
        self._audit.issued(caller, event.server_id, event.token.version, via="watch")
