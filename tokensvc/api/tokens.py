"""TokenService: what brokers call."""

from __future__ import annotations

from tokensvc.api.convert import duration, token_to_proto
from tokensvc.api.errors import Context, handles_errors
from tokensvc.errors import InvalidArgument
from tokensvc.manager import TokenManager
from tokensvc.registration import validate_server_id
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc


class TokenServicer(pb_grpc.TokenServiceServicer):
    def __init__(self, manager: TokenManager) -> None:
        self._manager = manager

    @handles_errors
    async def GetToken(self, request: pb.GetTokenRequest, context: Context) -> pb.Token:
        validate_server_id(request.server_id, "server_id")
        rejected = request.rejected_token_sha256
        if rejected and (
            len(rejected) != 64 or not all(c in "0123456789abcdefABCDEF" for c in rejected)
        ):
            raise InvalidArgument(
                "rejected_token_sha256", "must be the 64 hex digits of the token's SHA-256"
            )
        held = await self._manager.get_token(
            request.server_id,
            duration(request.min_valid_for, "min_valid_for", self._manager.min_valid_for),
            rejected,
        )
        return token_to_proto(held)
