"""Prometheus metrics: what an operator alerts on, scraped from the real listener."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tokensvc import metrics
from tokensvc.demo.authserver import AuthServer, Behaviour
from tokensvc.errors import ConfigurationError
from tokensvc.token import Token, utcnow
from tokensvc.v1 import tokensvc_pb2 as pb

from support import FakeClock, Watcher, epoch, running_service, sample, scrape

GET_TOKEN = "tokensvc.v1.TokenService/GetToken"
WATCH = "tokensvc.v1.TokenService/WatchTokens"


async def test_an_operator_sees_expiry_results_by_reason_and_every_rpc_unary_or_streaming(
    tmp_path: Path, auth: AuthServer
) -> None:
    auth.add_client("m-refused-client", "the-real-secret")
    async with running_service(
        tmp_path, auth, run_scheduler=False, metrics_listen="127.0.0.1:0"
    ) as h:
        port = h.service.metrics_port
        assert port > 0
        # The registry is the process's: other tests' calls are counted too.
        before = await scrape(port)
        await h.register("m-ok")
        token = await h.tokens.GetToken(pb.GetTokenRequest(server_id="m-ok"))
        await h.register("m-refused", client_id="m-refused-client", secret="a-wrong-secret")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await h.tokens.GetToken(pb.GetTokenRequest(server_id="m-refused"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        auth.behaviour = Behaviour(fail_status=503)
        await h.register("m-down")
        with pytest.raises(grpc.aio.AioRpcError):
            await h.tokens.GetToken(pb.GetTokenRequest(server_id="m-down"))
        auth.behaviour = Behaviour()

        watcher = Watcher(h.tokens, "m-ok")
        await watcher.until("synced")
        reflection = reflection_pb2_grpc.ServerReflectionStub(h.channel)
        async for _ in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            pass
        during = await scrape(port)
        await watcher.close()
        await h.admin.DeleteServer(pb.DeleteServerRequest(id="m-ok"))
        after = await scrape(port)

    expiry = sample(during, "tokensvc_token_expiry_timestamp_seconds", server_id="m-ok")
    assert expiry == epoch(token.expires_at)
    issued = sample(during, "tokensvc_token_issued_timestamp_seconds", server_id="m-ok")
    assert issued is not None and issued < expiry
    requests = "tokensvc_token_requests_total"
    assert sample(during, requests, server_id="m-ok", result="ok") == 1
    assert sample(during, requests, server_id="m-refused", result="credentials_rejected")
    assert sample(during, requests, server_id="m-down", result="authorization_server_unavailable")
    assert sample(during, "tokensvc_token_request_duration_seconds_count", server_id="m-ok") == 1
    assert sample(during, "tokensvc_token_rotations_total", server_id="m-ok") == 1
    assert sample(during, "tokensvc_watch_streams") == 1
    assert sample(during, "tokensvc_database_up") == 1
    assert sample(during, "tokensvc_build_info", version=metrics.__version__) == 1

    calls = "rpc_server_call_duration_seconds_count"
    grpc_labels = {"rpc_system_name": "grpc"}

    def grown(text: str, name: str, **labels: str) -> float:
        return (sample(text, name, **labels) or 0) - (sample(before, name, **labels) or 0)

    assert grown(during, calls, rpc_method=GET_TOKEN, rpc_response_status_code="OK") == 1
    assert sample(
        during, calls, rpc_method=GET_TOKEN, rpc_response_status_code="FAILED_PRECONDITION"
    )
    assert sample(during, calls, rpc_method=GET_TOKEN, rpc_response_status_code="UNAVAILABLE")
    reflect = "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert sample(during, calls, rpc_method=reflect, rpc_response_status_code="OK", **grpc_labels)
    # A stream is measured when it ends: here, cancelled by the broker.
    assert grown(during, calls, rpc_method=WATCH) == 0
    assert grown(after, calls, rpc_method=WATCH, rpc_response_status_code="CANCELLED") == 1
    # The snapshot token and the synced marker.
    assert grown(after, "rpc_server_responses_per_rpc_sum", rpc_method=WATCH) == 2
    assert sample(after, "tokensvc_watch_streams") == 0
    # A deleted server leaves no expiry behind to alert on.
    assert sample(after, "tokensvc_token_expiry_timestamp_seconds", server_id="m-ok") is None


async def test_refresh_lag_is_how_late_a_scheduled_refresh_started(
    tmp_path: Path, auth: AuthServer
) -> None:
    clock = FakeClock()
    async with running_service(tmp_path, auth, clock=clock) as h:
        await h.register("m-lag")
        manager = h.service.manager
        assert manager is not None
        due = manager.scheduler.due_at("m-lag")
        assert due is not None
        before = _lag()
        clock.now = due
        clock.advance(7)
        assert await manager.scheduler.run_due() == ["m-lag"]
        after = _lag()
    assert after[1] == before[1] + 1
    assert after[0] - before[0] == pytest.approx(7)


def _lag() -> tuple[float, float]:
    """The refresh lag histogram's sum and count."""
    value = metrics.REGISTRY.get_sample_value
    total = value("tokensvc_refresh_lag_seconds_sum")
    count = value("tokensvc_refresh_lag_seconds_count")
    assert total is not None and count is not None
    return total, count


async def test_reports_of_rejected_tokens_and_waiters_on_one_refresh_are_counted(
    tmp_path: Path, auth: AuthServer
) -> None:
    async with running_service(
        tmp_path, auth, run_scheduler=False, metrics_listen="127.0.0.1:0"
    ) as h:
        await h.register("m-flight")
        old = await h.tokens.GetToken(pb.GetTokenRequest(server_id="m-flight"))
        sha = _sha256(old.access_token)
        gate = asyncio.Event()
        auth.behaviour = Behaviour(gate=gate)
        manager = h.service.manager
        assert manager is not None
        # In process, so that all have joined by the time the one refresh asks.
        reports = [
            asyncio.ensure_future(manager.get_token("m-flight", rejected_sha256=sha))
            for _ in range(20)
        ]
        await auth.wait_for_requests(2)
        text = await scrape(h.service.metrics_port)
        gate.set()
        new = {t.token.access_token for t in await asyncio.gather(*reports)}
        stale = await h.tokens.GetToken(
            pb.GetTokenRequest(server_id="m-flight", rejected_token_sha256=sha)
        )
        after = await scrape(h.service.metrics_port)
    assert len(new) == 1 and stale.access_token in new and auth.token_requests == 2
    assert sample(text, "tokensvc_single_flight_waiters") == 20
    assert sample(after, "tokensvc_single_flight_waiters") == 0
    reports_total = "tokensvc_rejected_token_reports_total"
    assert sample(after, reports_total, server_id="m-flight", outcome="refreshed") == 20
    assert sample(after, reports_total, server_id="m-flight", outcome="stale") == 1


def _sha256(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()


async def test_without_the_server_label_the_soonest_expiry_is_shown(
    tmp_path: Path, auth: AuthServer
) -> None:
    try:
        async with running_service(
            tmp_path,
            auth,
            run_scheduler=False,
            metrics_listen="127.0.0.1:0",
            metrics_per_server=False,
        ) as h:
            auth.behaviour = Behaviour(lifetime=600)
            await h.register("m-short")
            auth.behaviour = Behaviour(lifetime=3600)
            await h.register("m-long")
            short = await h.tokens.GetToken(pb.GetTokenRequest(server_id="m-short"))
            text = await scrape(h.service.metrics_port)
    finally:
        metrics.configure(per_server=True)
    assert "m-short" not in text and "m-long" not in text
    assert sample(text, "tokensvc_token_expiry_timestamp_seconds") == pytest.approx(
        epoch(short.expires_at)
    )
    assert sample(text, "tokensvc_token_requests_total", result="ok") is not None


def test_without_the_server_label_the_soonest_follows_each_rotation_and_removal() -> None:
    def held(server_id: str, expires_in: int) -> None:
        metrics.token_held(
            server_id, Token("t", "Bearer", now, now + timedelta(seconds=expires_in))
        )

    def shown() -> float | None:
        return metrics.REGISTRY.get_sample_value(
            "tokensvc_token_expiry_timestamp_seconds", {"server_id": ""}
        )

    now = utcnow()
    metrics.configure(per_server=False)
    try:
        for server_id, expires_in in (("a", 300), ("b", 100), ("c", 200)):
            held(server_id, expires_in)
        assert shown() == (now + timedelta(seconds=100)).timestamp()
        held("b", 400)  # the soonest rotated: the next one shows
        assert shown() == (now + timedelta(seconds=200)).timestamp()
        metrics.server_forgotten("c")
        assert shown() == (now + timedelta(seconds=300)).timestamp()
        held("a", 50)  # a rotation may also bring an expiry nearer
        assert shown() == (now + timedelta(seconds=50)).timestamp()
        for server_id in ("a", "b"):
            metrics.server_forgotten(server_id)
        assert shown() is None
    finally:
        metrics.configure(per_server=True)


async def test_a_taken_metrics_port_is_refused_clearly(tmp_path: Path, auth: AuthServer) -> None:
    async with running_service(tmp_path / "a", auth, metrics_listen="127.0.0.1:0") as h:
        taken = f"127.0.0.1:{h.service.metrics_port}"
        with pytest.raises(ConfigurationError, match=f"metrics_listen {taken}"):
            async with running_service(tmp_path / "b", auth, metrics_listen=taken):
                pass
