"""WatchTokens over real gRPC: the contract of the proto comments."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from tokensvc.demo.authserver import AuthServer
from tokensvc.v1 import tokensvc_pb2 as pb

from support import CLIENT_ID, Harness, Watcher, error_info, rotate, running_service, sha

TIMEOUT = 30


async def test_a_stream_starts_with_the_current_tokens_then_synced_then_changes(
    harness: Harness,
) -> None:
    await harness.register("alpha")
    await harness.register("beta")
    alpha = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="beta"))
    watcher = Watcher(harness.tokens)
    await watcher.until("synced")
    assert watcher.kinds() == ["token", "token", "synced"]
    assert [e.token.server_id for e in watcher.events[:2]] == ["alpha", "beta"]
    assert watcher.events[0].token.access_token == alpha.access_token
    rotated = await rotate(harness, alpha)
    event = await watcher.until("token", version=rotated.version)
    assert event.token.access_token == rotated.access_token != alpha.access_token
    assert [e.sequence for e in watcher.events] == list(range(1, len(watcher.events) + 1))
    await watcher.close()


async def test_a_stream_of_named_servers_sees_only_them_and_unknown_ids_arrive_later(
    harness: Harness,
) -> None:
    await harness.register("alpha")
    await harness.register("beta")
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    watcher = Watcher(harness.tokens, "alpha", "later")
    await watcher.until("synced")
    assert watcher.kinds()[-1] == "synced"
    assert {e.token.server_id for e in watcher.events if e.token.server_id} == {"alpha"}
    assert (await watcher.until("removed")).removed.server_id == "later"
    await harness.register("later")
    assert (await watcher.until("token", server_id="later")).token.version == 1
    await rotate(harness, await harness.tokens.GetToken(pb.GetTokenRequest(server_id="beta")))
    assert all(e.token.server_id != "beta" for e in watcher.events)
    await watcher.close()


async def test_a_new_secret_reaches_watchers_at_once_and_the_old_token_is_gone(
    harness: Harness,
) -> None:
    await harness.register()
    old = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    watcher = Watcher(harness.tokens, "alpha")
    await watcher.until("synced")
    harness.auth.add_client(CLIENT_ID, "the-new-secret")
    started = time.monotonic()
    updated = await harness.register(secret="the-new-secret")
    revoked = await watcher.until("revoked", revision=updated.revision)
    fresh = await watcher.until("token", version=old.version + 1)
    elapsed = time.monotonic() - started
    print(f"re-registration to new token at the watcher: {elapsed * 1000:.0f} ms")
    assert elapsed < 5  # well under a second on an idle machine
    assert watcher.events.index(revoked) < watcher.events.index(fresh)
    assert fresh.token.access_token != old.access_token
    served = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    assert served.access_token == fresh.token.access_token
    await watcher.close()


async def test_a_deleted_server_is_announced_as_removed(harness: Harness) -> None:
    await harness.register()
    await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    watcher = Watcher(harness.tokens)
    await watcher.until("synced")
    await harness.admin.DeleteServer(pb.DeleteServerRequest(id="alpha"))
    assert (await watcher.until("removed")).removed.server_id == "alpha"
    await watcher.close()


async def test_a_failed_refresh_is_streamed_and_the_token_stays_valid(harness: Harness) -> None:
    await harness.register()
    current = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    watcher = Watcher(harness.tokens, "alpha")
    await watcher.until("synced")
    harness.auth.behaviour.fail_status = 503
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # a broker reports a 401: refresh, fails
        await harness.tokens.GetToken(
            pb.GetTokenRequest(server_id="alpha", rejected_token_sha256=sha(current.access_token))
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    served = await harness.tokens.GetToken(pb.GetTokenRequest(server_id="alpha"))
    assert served.access_token == current.access_token  # still valid: served through the outage
    failed = (await watcher.until("failed")).failed
    assert failed.server_id == "alpha" and not failed.permanent
    assert failed.error.reason == "AUTHORIZATION_SERVER_UNAVAILABLE"
    assert failed.current_expires_at == current.expires_at
    assert failed.next_attempt_time.ToDatetime() > failed.error.time.ToDatetime()
    await watcher.close()


async def test_streams_end_cleanly_when_tokensvc_shuts_down(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with running_service(tmp_path, auth) as h:
        await h.register()
        watcher = Watcher(h.tokens)
        await watcher.until("synced")
        await h.service.stop(grace=5)
        await asyncio.wait_for(watcher.task, TIMEOUT)  # ends, without an error
        assert await watcher.call.code() == grpc.StatusCode.OK


async def test_bad_watch_requests_name_the_field(harness: Harness) -> None:
    call = harness.tokens.WatchTokens(pb.WatchTokensRequest(server_ids=["ok", "Not OK"]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "server_ids[1]"
