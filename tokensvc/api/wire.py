"""How the services meet grpc.aio: generic handlers only, and TokenService's
responses serialized once per token rather than once per call.

A held token (:class:`~tokensvc.token.ServerToken`) never changes: a rotation
makes a new one. So the bytes of its ``Token`` message are made the first time
it is served and reused for every ``GetToken`` and every ``WatchTokens``
stream until the manager lets go of it; they are forgotten as soon as nothing
holds the token any more (a rotation, a new revision, a deletion), so that no
copy of an access token outlives the token itself. TokenService is registered
without response serializers for that (:func:`add_token_service`): its
methods return these bytes. GetToken has no request deserializer either: a
call that repeats one already answered is recognised by its bytes
(tokensvc.api.repeats) and never parsed.

Every service is served through its generic handler alone
(:func:`generic_handlers_only`): for each call it accepts, grpc.aio (1.85)
waits on one task per *registered* method (``asyncio.wait`` over all of them),
which with tokensvc's 18 methods cost about 40 µs of every call, more than
all of GetToken's own work. A generic handler serves the same methods.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import grpc

from tokensvc.api.convert import token_to_proto
from tokensvc.token import ServerToken
from tokensvc.v1 import tokensvc_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["TokenService"].full_name
# TokenEvent's field tags (field number << 3 | wire type): sequence = 1
# (varint), token = 2 (length-delimited).
_SEQUENCE_TAG, _TOKEN_TAG = b"\x08", b"\x12"


def _varint(value: int) -> bytes:
    """``value`` (≥ 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class TokenWire:
    """The serialized ``Token`` of each held token, per server."""

    def __init__(self) -> None:
        # server id -> (the token, weakly; its Token message's bytes)
        self._held: dict[str, tuple[weakref.ref[ServerToken], bytes]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def token(self, held: ServerToken) -> bytes:
        """The bytes of ``token_to_proto(held)``."""
        entry = self._held.get(held.server_id)
        if entry is not None and entry[0]() is held:
            return entry[1]
        data: bytes = token_to_proto(held).SerializeToString()
        self._held[held.server_id] = (weakref.ref(held, self._forget(held.server_id)), data)
        return data

    def token_event(self, held: ServerToken, sequence: int) -> bytes:
        """The bytes of ``TokenEvent(sequence=sequence, token=token_to_proto(held))``:
        the token's bytes as made once, behind this stream's sequence number."""
        body = self.token(held)
        head = _SEQUENCE_TAG + _varint(sequence) if sequence else b""
        return b"".join((head, _TOKEN_TAG, _varint(len(body)), body))

    def _forget(self, server_id: str) -> Callable[[weakref.ref[ServerToken]], None]:
        def forget(ref: weakref.ref[ServerToken]) -> None:
            entry = self._held.get(server_id)
            if entry is not None and entry[0] is ref:
                del self._held[server_id]

        return forget


def _not_registered(service_name: str, method_handlers: dict[str, Any]) -> None:
    """The generated code registers each method twice; its generic handler serves it."""


def generic_handlers_only(server: grpc.aio.Server) -> grpc.aio.Server:
    """``server``, on which the generated ``add_*_to_server`` functions (ours,
    health's, reflection's, Envoy's) add generic handlers only."""
    server.add_registered_method_handlers = _not_registered
    return server


def add_token_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Adds TokenService like the generated ``add_TokenServiceServicer_to_server``,
    except that its responses are bytes already (see :class:`TokenWire`) and
    that it adds no registered methods (see :func:`generic_handlers_only`)."""
    handlers = {
        "GetToken": grpc.unary_unary_rpc_method_handler(
            servicer.GetToken,
            request_deserializer=None,  # parsed by GetToken, unless a repeat
            response_serializer=None,  # bytes already
        ),
        "WatchTokens": grpc.unary_stream_rpc_method_handler(
            servicer.WatchTokens,
            request_deserializer=pb.WatchTokensRequest.FromString,
            response_serializer=None,  # bytes already
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
