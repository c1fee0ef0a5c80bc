"""The broker side: tokens from tokensvc without a round trip, and an httpx2 auth.

::

    async with TokenClient("127.0.0.1:50051", server_ids=["weather"]) as tokens:
        auth = TokenAuth(tokens, "weather")
        async with httpx2.AsyncClient(auth=auth) as http:
            ...  # every request carries a valid bearer token

``TokenClient`` keeps a local map of tokens fed by ``WatchTokens``: rotations
arrive before the old token expires, so ``get_token`` answers from memory. It
falls back to ``GetToken`` when the map has nothing fresh, and reconnects the
stream with backoff (resyncing from the snapshot every new stream starts with).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import grpc
import httpx2
from google.protobuf.duration_pb2 import Duration

from tokensvc.token import DEFAULT_MIN_VALID_FOR, Clock, fresh_enough, sha256_hex, utcnow
from tokensvc.v1 import tokensvc_pb2 as pb
from tokensvc.v1 import tokensvc_pb2_grpc as pb_grpc

__all__ = ["BrokerToken", "TokenAuth", "TokenClient"]

# While the stream is synced, a pushed token is used until this close to its
# expiry: tokensvc pushes its successor at about half the lifetime, long before,
# and the margin covers the trip to the MCP server. Without a stream, or when a
# caller asks for a longer validity, the freshness rule of tokensvc applies.
SYNCED_MARGIN = timedelta(seconds=1)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerToken:
    server_id: str
    access_token: str
    token_type: str
    issued_at: datetime
    expires_at: datetime
    version: int

    def __repr__(self) -> str:
        return (
            f"BrokerToken(server_id={self.server_id!r}, version={self.version}, "
            f"expires_at={self.expires_at.isoformat()})"
        )

    @property
    def authorization(self) -> str:
        return f"{self.token_type} {self.access_token}"

    def fresh(self, wanted: timedelta, now: datetime) -> bool:
        return fresh_enough(self.issued_at, self.expires_at, wanted, now)

    @classmethod
    def from_proto(cls, token: pb.Token) -> BrokerToken:
        return cls(
            server_id=token.server_id,
            access_token=token.access_token,
            token_type=token.token_type or "Bearer",
            issued_at=token.issued_at.ToDatetime(tzinfo=UTC),
            expires_at=token.expires_at.ToDatetime(tzinfo=UTC),
            version=token.version,
        )


class TokenClient:
    """Tokens for ``server_ids`` (empty: every server the caller may see)."""

    def __init__(
        self,
        target: str,
        server_ids: Sequence[str] = (),
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        min_valid_for: timedelta = DEFAULT_MIN_VALID_FOR,
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        clock: Clock = utcnow,
        on_token: Callable[[BrokerToken, BrokerToken | None], None] | None = None,
    ) -> None:
        """``on_token(new, previous)`` is called for every new token the stream
        brings (an exception in it is logged, not raised)."""
        self._own_channel = channel is None
        if channel is None:
            # gRPC's own reconnect backoff (1 s growing to 120 s by default)
            # decides how soon a dropped channel comes back: align it with ours.
            options = [
                ("grpc.initial_reconnect_backoff_ms", int(reconnect_initial * 1000)),
                ("grpc.min_reconnect_backoff_ms", int(reconnect_initial * 1000)),
                ("grpc.max_reconnect_backoff_ms", int(reconnect_max * 1000)),
            ]
            channel = (
                grpc.aio.secure_channel(target, credentials, options=options)
                if credentials is not None
                else grpc.aio.insecure_channel(target, options=options)
            )
        self._channel = channel
        self._stub = pb_grpc.TokenServiceStub(channel)
        self._server_ids = list(server_ids)
        self._min_valid_for = min_valid_for
        self._reconnect = (reconnect_initial, reconnect_max)
        self._clock = clock
        self._on_token = on_token
        self._tokens: dict[str, BrokerToken] = {}
        # Bumped by `revoked` and `removed`: a GetToken answer that was in
        # flight meanwhile must not bring the voided token back.
        self._generations: dict[str, int] = {}
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0
        self.rotations = 0
        self.round_trips = 0  # get_token and report_rejected calls that asked tokensvc

    async def __aenter__(self) -> TokenClient:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch_forever(), name="tokensvc-watch")

    @property
    def synced(self) -> bool:
        """True while a stream is up and has delivered the current state."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        """Returns once the current stream has delivered the current state."""
        await self._synced.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._own_channel:
            await self._channel.close()

    def cached(self, server_id: str) -> BrokerToken | None:
        return self._tokens.get(server_id)

    async def get_token(
        self, server_id: str, min_valid_for: timedelta | None = None
    ) -> BrokerToken:
        """A token from memory when the stream has one, else from ``GetToken``.
        While the stream is synced, the pushed token is used until
        ``SYNCED_MARGIN`` before its expiry (its successor comes before that);
        otherwise, or with ``min_valid_for``, it must be valid that long (at
        most half its lifetime is asked for)."""
        wanted = self._min_valid_for if min_valid_for is None else min_valid_for
        held = self._tokens.get(server_id)
        if held is not None:
            now = self._clock()
            if min_valid_for is None and self.synced:
                if held.expires_at - now >= SYNCED_MARGIN:
                    return held
            elif held.fresh(wanted, now):
                return held
        request = pb.GetTokenRequest(server_id=server_id)
        if min_valid_for is not None:
            request.min_valid_for.CopyFrom(_duration(wanted))
        return await self._ask(request)

    async def report_rejected(self, server_id: str, access_token: str) -> BrokerToken:
        """Says an MCP server answered 401 to ``access_token``; returns the
        token to use now (a new one, fetched once however many report it)."""
        held = self._tokens.get(server_id)
        if held is not None and held.access_token != access_token:
            if held.fresh(self._min_valid_for, self._clock()):
                return held  # the stream already brought its successor
        elif held is not None:
            del self._tokens[server_id]
        return await self._ask(
            pb.GetTokenRequest(server_id=server_id, rejected_token_sha256=sha256_hex(access_token))
        )

    async def _ask(self, request: pb.GetTokenRequest) -> BrokerToken:
        generation = self._generations.get(request.server_id, 0)
        self.round_trips += 1
        token = BrokerToken.from_proto(await self._stub.GetToken(request))
        if self._generations.get(request.server_id, 0) != generation:
            return token  # voided meanwhile: the caller may use it once, it is not kept
        held = self._tokens.get(token.server_id)
        if held is not None and held.version > token.version:
            return held  # the stream already brought a newer one
        self._tokens[token.server_id] = token
        return token

    async def _watch_forever(self) -> None:
        delay = self._reconnect[0]
        while True:
            try:
                async for _ in self._watch_once():
                    delay = self._reconnect[0]  # a working stream resets the backoff
            except grpc.aio.AioRpcError as exc:
                log.debug("token stream failed", extra={"code": exc.code().name})
            except Exception as exc:  # never let the stream die for good
                log.warning("token stream failed", extra={"exc_type": type(exc).__name__})
            self._synced.clear()
            self.reconnects += 1
            await asyncio.sleep(random.uniform(0, delay))  # full jitter
            delay = min(delay * 2, self._reconnect[1])

    async def _watch_once(self) -> AsyncGenerator[None, None]:
        call = self._stub.WatchTokens(
            pb.WatchTokensRequest(server_ids=self._server_ids), wait_for_ready=True
        )
        try:
            seen: set[str] = set()
            async for event in call:
                which = event.WhichOneof("event")
                if which == "token":
                    self._received(BrokerToken.from_proto(event.token), resync=not self.synced)
                    seen.add(event.token.server_id)
                elif which in ("revoked", "removed"):
                    server_id = getattr(event, which).server_id
                    self._tokens.pop(server_id, None)
                    self._generations[server_id] = self._generations.get(server_id, 0) + 1
                elif which == "synced":
                    # Whatever the snapshot did not mention is gone (or has no
                    # valid token): drop it rather than trust a stale copy.
                    for server_id in set(self._tokens) - seen:
                        self._tokens.pop(server_id, None)
                    self._synced.set()
                yield None
        finally:
            call.cancel()

    def _received(self, token: BrokerToken, resync: bool) -> None:
        previous = self._tokens.get(token.server_id)
        if previous is not None and (
            previous.access_token == token.access_token
            # After the snapshot, versions only grow. In it, a lower version
            # means the server was deleted and registered again meanwhile.
            or (not resync and previous.version >= token.version)
        ):
            return
        self._tokens[token.server_id] = token
        if self._synced.is_set():
            self.rotations += 1
        if self._on_token is not None:
            try:
                self._on_token(token, previous)
            except Exception as exc:
                log.warning("on_token callback failed", extra={"exc_type": type(exc).__name__})


def _duration(value: timedelta) -> Duration:
    result = Duration()
    result.FromTimedelta(value)
    return result


class TokenAuth(httpx2.Auth):
    """Sets ``Authorization`` from a :class:`TokenClient`; on a 401, reports the
    token and retries the request once with the token tokensvc gives back.

    Plug it into the official MCP SDK client with
    ``streamable_http_client(url, http_client=httpx2.AsyncClient(auth=TokenAuth(...)))``.
    """

    requires_request_body = True  # so that the request can be sent twice

    def __init__(self, client: TokenClient, server_id: str) -> None:
        self._client = client
        self._server_id = server_id
        self.retries = 0

    def sync_auth_flow(self, request: httpx2.Request) -> Any:
        raise RuntimeError("TokenAuth is async: use it with httpx2.AsyncClient")

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        token = await self._client.get_token(self._server_id)
        request.headers["Authorization"] = token.authorization
        response = yield request
        if response.status_code == 401:
            self.retries += 1
            fresh = await self._client.report_rejected(self._server_id, token.access_token)
            request.headers["Authorization"] = fresh.authorization
            yield request
